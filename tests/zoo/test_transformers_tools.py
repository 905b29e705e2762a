"""Every moezoo tool on a converted transformers model: the fine-tuning recipes (each with its own
check: frozen parameters bit-identical, ESFT trains only the experts it selected by routed-token share),
EvalCapacity, the routing monitor (heatmaps, dead-expert warning), the routing report and its command,
and the Triton backend (in Triton's interpreter)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

import moezoo
from moezoo.cli import main
from moezoo.layers import aux_loss, routed_layers
from moezoo.modalities.text import CausalLMFineTuning, TextDataModule, lm_loss
from moezoo.monitoring import RoutingMonitor
from moezoo.report import routing_report
from moezoo.zoo.hf import TransformersMoE
from moezoo.zoo.recipes import EvalCapacity, ExpertDropout, ExpertSpecialisedFineTuning, FreezeDense, FreezeMoE
from tests.zoo.test_transformers import foreign_grads
from tests.zoo.tiny_transformers import COMMON, CONFIGS, tiny_model, tokens

ROOT = Path(__file__).resolve().parents[2]
MIXTRAL = {"model_type": "mixtral", **COMMON, **CONFIGS["mixtral"], "vocab_size": 256}


def data() -> TextDataModule:
    return TextDataModule("pydoc_topics", "bytes", context_length=16, batch_size=4)


def fit(tmp_path: Path, callbacks: list[Callback], steps: int = 4, config: dict = MIXTRAL, **trainer):
    """A few steps of CausalLMFineTuning on a tiny converted model; returns the task and its
    state dict as the optimiser first saw it (after the recipes' setup)."""
    L.seed_everything(0)
    task = CausalLMFineTuning(config=config, lr=0.05, weight_decay=0.1, log_routing_every_n_steps=1)
    start = {}

    class Record(Callback):
        def on_train_start(self, trainer, pl_module):
            start.update({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    options = dict(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer_ = L.Trainer(callbacks=[*callbacks, Record()], **{**options, **trainer})
    trainer_.fit(task, data())
    return task, trainer_, start


def routed_names(model) -> set[str]:
    return {f"{name}.{p}" for name, layer in routed_layers(model) for p, _ in layer.named_parameters()}


def check_freezing(task, trainer, start) -> tuple[set[str], set[str]]:
    params = dict(task.model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    trainable = set(params) - frozen
    assert frozen and trainable
    for n in frozen:
        assert torch.equal(params[n].detach(), start[n]), n
    assert all(not torch.equal(params[n].detach(), start[n]) for n in trainable)
    assert {id(p) for p in trainer.optimizers[0].state} == {id(params[n]) for n in trainable}
    return frozen, trainable


def test_the_task_trains_a_converted_model_with_its_auxiliary_loss(tmp_path):
    task, _, start = fit(tmp_path, [], steps=3)
    layers = [m for m in task.model.modules() if isinstance(m, TransformersMoE)]
    assert len(layers) == 2 and task.model.config.model_type == "mixtral"
    assert any(not torch.equal(v, start[k]) for k, v in task.model.state_dict().items())
    batch = next(iter(data().train_dataloader()))
    task.eval()
    loss, _ = lm_loss(task.logits, batch)
    aux = aux_loss(task.model)
    expected = task.model(batch[:, :-1], output_router_logits=True)
    # the task's objective is transformers' own: the LM loss plus coef x the pooled auxiliary loss
    torch.testing.assert_close(loss, F.cross_entropy(expected.logits.reshape(-1, 256), batch[:, 1:].reshape(-1)))
    torch.testing.assert_close(aux, task.model.config.router_aux_loss_coef * expected.aux_loss)
    assert aux > 0


def test_freeze_moe_on_a_converted_model(tmp_path):
    task, trainer, start = fit(tmp_path, [FreezeMoE()])
    frozen, _ = check_freezing(task, trainer, start)
    assert frozen == routed_names(task.model)


def test_freeze_dense_on_a_converted_model(tmp_path):
    task, trainer, start = fit(tmp_path, [FreezeDense()])
    _, trainable = check_freezing(task, trainer, start)
    assert trainable == routed_names(task.model)


def test_expert_dropout_on_a_converted_model(tmp_path):
    task, _, _ = fit(tmp_path, [ExpertDropout(rate=0.4)], steps=1)
    experts = [layer.experts for _, layer in routed_layers(task.model)]
    assert experts and all(e.dropout == 0.4 for e in experts)
    x = tokens()
    task.model.train()
    first, second = task.model(x).logits, task.model(x).logits
    assert not torch.equal(first, second)  # the experts drop units in training
    task.model.eval()
    assert torch.equal(task.model(x).logits, task.model(x).logits)


def test_esft_on_a_converted_model_trains_only_the_experts_the_task_routes_most(tmp_path):
    esft = ExpertSpecialisedFineTuning(threshold=0.5, num_batches=3)
    task, trainer, start = fit(tmp_path, [esft], config={**MIXTRAL, "num_local_experts": 8})
    model = task.model
    # The selection, recomputed from transformers' own router logits on the same batches: each
    # expert's share of the top-k assignments, the fewest experts covering half of them.
    L.seed_everything(0)
    reference = CausalLMFineTuning(config={**MIXTRAL, "num_local_experts": 8}).model.eval()
    loader = data().train_dataloader()
    batches = [b for _, b in zip(range(3), loader)]
    counts = None
    with torch.no_grad():
        for batch in batches:
            logits = reference(batch, output_router_logits=True).router_logits
            per_layer = torch.stack([torch.bincount(torch.softmax(layer, -1).topk(2).indices.reshape(-1), minlength=8)
                                     for layer in logits]).float()
            counts = per_layer if counts is None else counts + per_layer
    names = [name for name, _ in routed_layers(model)]
    for layer_counts, name in zip(counts, names):
        share = layer_counts / layer_counts.sum()
        order = torch.argsort(share, descending=True)
        count = int((torch.cumsum(share[order], 0) < 0.5).sum()) + 1
        assert esft.selected[name] == sorted(order[:count].tolist())
    changed = False
    for name, layer in routed_layers(model):
        chosen = esft.selected[name]
        assert 1 <= len(chosen) < 8
        for pname, p in layer.experts.named_parameters():
            before = start[f"{name}.experts.{pname}"]
            for e in range(8):
                same = torch.equal(p.detach()[e], before[e])
                assert same or e in chosen, (name, pname, e)
                changed |= not same
    assert changed
    experts = {f"{name}.experts.{p}" for name, layer in routed_layers(model) for p, _ in layer.experts.named_parameters()}
    for n, p in model.named_parameters():
        if n not in experts:
            assert not p.requires_grad and torch.equal(p.detach(), start[n]), n


def test_eval_capacity_drops_tokens_at_evaluation_only():
    model = moezoo.from_transformers(tiny_model("olmoe"))
    full = model(tokens()).logits
    EvalCapacity(capacity_factor=0.5).setup(None, model, "validate")
    with torch.no_grad():
        capped = model(tokens()).logits
    dropped = [float(layer.last_stats["dropped_fraction"]) for _, layer in routed_layers(model)]
    assert all(d > 0.2 for d in dropped) and not torch.allclose(capped, full)
    model.train()
    model(tokens())
    assert all(float(layer.last_stats["dropped_fraction"]) == 0 for _, layer in routed_layers(model))


def test_routing_monitor_draws_heatmaps_and_warns_of_dead_experts(tmp_path, caplog):
    L.seed_everything(0)
    monitor = RoutingMonitor(every_n_steps=2, dead_after=2)

    class KillExpert3(Callback):
        """Zero gate rows 1-3: ties go to the lower index, so expert 3 never makes a top-2."""

        def setup(self, trainer, pl_module, stage):
            for _, layer in routed_layers(pl_module.model):
                with torch.no_grad():
                    layer.router.gate.weight[1:] = 0.0

    with caplog.at_level(logging.WARNING, logger="moezoo"):
        fit(tmp_path, [KillExpert3(), FreezeMoE(), monitor], steps=4)
    assert monitor.heatmap_files and all(f.is_file() and f.stat().st_size > 0 for f in monitor.heatmap_files)
    warned = [r.getMessage() for r in caplog.records if "is dead" in r.getMessage()]
    assert warned and all("expert 3 of layer model.model.layers." in m for m in warned)


def test_routing_report_command_on_the_shipped_config(tmp_path):
    out = tmp_path / "report"
    assert main(["routing-report", "--config", str(ROOT / "configs/text/hf_moe_finetune.yaml"), "--out", str(out),
                 "--max-batches", "2"]) == 0
    record = json.loads((out / "report.json").read_text())
    assert record["batches"] == 2 and len(record["layers"]) == 2
    for layer in record["layers"].values():
        assert len(layer["share_per_expert"]) == 8 and sum(layer["share_per_expert"]) == pytest.approx(1.0)
    assert (out / "report.html").is_file() and (out / "load_heatmap.png").is_file()


def test_routing_report_function_on_a_converted_model(tmp_path):
    model = moezoo.from_transformers(tiny_model("deepseek_v3"))
    record = routing_report(model, [tokens(seed=s) for s in range(2)], tmp_path)
    assert record["batches"] == 2 and set(record["layers"]) == {"model.layers.1.mlp", "model.layers.2.mlp"}
    assert all(sum(layer["tokens_per_expert"]) == 2 * (2 * 9) * 3 for layer in record["layers"].values())


def test_triton_backend_on_a_converted_model(monkeypatch):
    from moezoo.kernels import triton_backend

    calls = []
    kernel = triton_backend.expert_mlp_triton
    monkeypatch.setattr(triton_backend, "expert_mlp_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    reference = tiny_model("qwen2_moe").train()
    model = moezoo.from_transformers(copy.deepcopy(reference), backend="triton")
    x = tokens()
    expected = reference(x, labels=x, output_router_logits=True)
    expected.loss.backward()
    out = model(x, labels=x)
    (out.loss + aux_loss(model)).backward()
    assert calls, "the Triton kernels did not run (TRITON_INTERPRET=1 must be set before triton is imported)"
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    grads = foreign_grads(model)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
