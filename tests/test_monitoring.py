"""Routing health: statistics against hand-computed routing, heatmaps written, dead experts
reported, the routing report rendered, active parameters summarised."""

from __future__ import annotations

import logging
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moezoo.cli import main
from moezoo.layers import MoE, parameter_counts
from moezoo.monitoring import RoutingMonitor, layer_statistics, load_heatmap
from moezoo.routers import TopKRouter

ROOT = Path(__file__).resolve().parents[1]


def test_layer_statistics_hand_worked():
    stats = {"tokens_per_expert": torch.tensor([6.0, 2.0, 0.0, 0.0]), "dropped_fraction": torch.tensor(0.25),
             "entropy": torch.tensor(0.5)}
    out = layer_statistics(stats, {"load_balancing": torch.tensor(1.5)})
    # mean 2, population std sqrt(((4)^2 + 0 + 4 + 4) / 4) = sqrt(6)
    assert out["load_cv"] == pytest.approx(6**0.5 / 2)
    assert out["load_max_over_mean"] == pytest.approx(3.0)
    assert out["dropped_fraction"] == 0.25 and out["entropy"] == 0.5 and out["loss/load_balancing"] == 1.5
    assert [out[f"share/expert_0{e}"] for e in range(4)] == [0.75, 0.25, 0.0, 0.0]


def test_router_stats_match_a_hand_computed_routing():
    router = TopKRouter(2, 2, k=1, capacity_factor=0.5).eval()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(2))
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    out = router(logits)
    # capacity ceil(4 * 0.5 / 2) = 1: tokens 0 and 3 kept, 1 and 2 dropped.
    assert out.stats["tokens_per_expert"].tolist() == [1.0, 1.0]
    assert out.stats["dropped_fraction"].item() == pytest.approx(0.5)
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    assert out.stats["entropy"].item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)


def test_dead_expert_is_reported_once(caplog):
    monitor = RoutingMonitor(every_n_steps=10, dead_after=3)
    with caplog.at_level(logging.WARNING, logger="moezoo"):
        for step in range(6):
            monitor._track_dead({"blocks.1.mlp": torch.tensor([5.0, 0.0, 3.0])}, step)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "expert 1 of layer blocks.1.mlp received no token for 3 consecutive training steps" in messages[0]


def test_heatmap_of_layers_with_different_expert_counts(tmp_path):
    # e.g. SwitchHead attention (heads x experts = 10) beside a 16-expert MLP.
    fig = load_heatmap([torch.full((10,), 0.1), torch.full((16,), 1 / 16)], ["attn", "mlp"], "mixed")
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (2, 16) and grid.mask[0, 10:].all() and not grid.mask[0, :10].any()
    assert float(grid[1, 15]) == pytest.approx(1 / 16)
    fig.savefig(tmp_path / "mixed.png")
    _png_is_a_picture(tmp_path / "mixed.png")


def _png_is_a_picture(path: Path) -> None:
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 5  # not a blank canvas


def test_monitor_writes_heatmaps_during_fit(tmp_path, capsys):
    main(["fit", "--config", str(ROOT / "configs/vision/vmoe_ti_digits.yaml"), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "3",
          "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
          "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--model.init_args.log_routing_every_n_steps", "1"])
    pictures = sorted(tmp_path.rglob("routing/*.png"))
    assert any(p.name.startswith("train_load_step") for p in pictures)
    assert any(p.name.startswith("val_load_step") for p in pictures)
    _png_is_a_picture(pictures[0])
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 10_000  # scalars and images were written
    assert "Active params per token" in capsys.readouterr().out


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_routing_report_on_the_shipped_entry(tmp_path):
    out = tmp_path / "report"
    assert main(["routing-report", "--config", str(ROOT / "configs/vision/vmoe_ti_digits.yaml"),
                 "--ckpt", str(ROOT / "moezoo/zoo/weights/vmoe_ti_digits.safetensors"),
                 "--split", "test", "--out", str(out), "--max-batches", "2"]) == 0
    for name in ("load_heatmap.png", "dropped_fraction.png", "top_patches_blocks_1_mlp.png"):
        _png_is_a_picture(out / name)
    parser = _Tags()
    parser.feed((out / "report.html").read_text())
    assert parser.tags.count("img") >= 3 and "table" in parser.tags
    assert "blocks.5.mlp" in (out / "report.json").read_text()


def test_active_parameters_count_k_of_e_experts():
    moe = MoE(8, 16, 4, TopKRouter(8, 4, k=1))
    counts = parameter_counts(moe)
    expert_params = sum(p.numel() for p in moe.experts.parameters())
    assert counts["total"] - counts["active"] == expert_params * 3 // 4


def test_routing_report_shows_per_modality_shares_for_limoe(tmp_path):
    out = tmp_path / "limoe_report"
    assert main(["routing-report", "--config", str(ROOT / "configs/language_image/limoe_ti_glyphs.yaml"),
                 "--split", "val", "--out", str(out), "--max-batches", "1"]) == 0
    _png_is_a_picture(out / "modality_share_per_expert.png")
    import json

    layers = json.loads((out / "report.json").read_text())["layers"]
    shares = layers["blocks.1.mlp"]["modality_share_per_expert"]
    assert set(shares) == {"image", "text"} and abs(sum(shares["text"]) - 1.0) < 1e-5


def test_routing_report_on_switchhead_attention_and_sigma_moe(tmp_path):
    out = tmp_path / "switchhead_report"
    assert main(["routing-report", "--config", str(ROOT / "configs/text/lm_switchhead_pydoc.yaml"),
                 "--ckpt", str(ROOT / "moezoo/zoo/weights/lm_switchhead_pydoc.safetensors"),
                 "--split", "val", "--out", str(out), "--max-batches", "1"]) == 0
    import json

    layers = json.loads((out / "report.json").read_text())["layers"]
    # Each SwitchHead layer routes twice (value and output projections): one entry per selector.
    assert "blocks.0.attn.sel_v" in layers and "blocks.0.attn.sel_o" in layers
    for entry in layers.values():
        assert abs(sum(entry["share_per_expert"]) - 1.0) < 1e-5
    _png_is_a_picture(out / "load_heatmap.png")
