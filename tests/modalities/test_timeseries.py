"""Time-MoE: conformance with the public reference, checkpoint layout, generation, losses, data, zoo, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moezoo.layers.attention import KVCache
from moezoo.modalities.timeseries import (
    ForecastWindows,
    RealSeries,
    SeriesDataModule,
    TimeMoE,
    WindowDataset,
    autoregressive_loss,
    evaluate_csv,
    evaluate_zero_shot,
    kernel_synth,
    load_real_series,
    seasonal_naive,
    time_moe_balance_loss,
)
from moezoo.modalities.timeseries.convert import REFERENCE_LAYOUT, from_reference, to_reference
from moezoo.modalities.timeseries.data import csv_borders
from moezoo.zoo import CheckpointError, create_model, get_entry

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "tests" / "data" / "time_moe_reference"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2, horizon_lengths=[1, 4, 8], backend="torch")


@pytest.fixture
def expected(time_moe_reference) -> dict[str, np.ndarray]:
    return time_moe_reference


@pytest.fixture(scope="module")
def reference_model() -> TimeMoE:
    return TimeMoE.from_pretrained(REFERENCE, backend="torch").eval()


def random_model(seed: int = 0, **overrides) -> TimeMoE:
    """A tiny model with O(1) weights (the N(0, 0.02) init makes every output about 0)."""
    torch.manual_seed(seed)
    model = TimeMoE(**{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


# -- conformance with the reference (tests/data/time_moe_reference.md) ---------------------------

def test_generate_matches_the_reference(reference_model, expected):
    context = torch.tensor(expected["context"])
    for h in expected["meta"]["horizons"]:  # 1 .. 30 with heads 1/4/8: several steps past the longest head
        ours = reference_model.forecast(context, h)
        np.testing.assert_allclose(ours.numpy(), expected[f"generate/{h}"], rtol=0, atol=1e-5, err_msg=f"h={h}")


def test_normalized_forecast_matches_the_reference_readme(reference_model, expected):
    ours = reference_model.forecast(torch.tensor(expected["readme/raw_context"]), 13, normalize=True)
    np.testing.assert_allclose(ours.numpy(), expected["readme/13"], rtol=1e-5, atol=1e-4)


def test_forward_heads_and_router_logits_match_the_reference(reference_model, expected):
    context = torch.tensor(expected["context"])
    with torch.no_grad():
        heads = reference_model(context)
        hidden = reference_model.hidden_states(context)
    np.testing.assert_allclose(hidden.numpy(), expected["forward/hidden"], atol=1e-5)
    assert len(heads) == 3
    for i, pred in enumerate(heads):
        np.testing.assert_allclose(pred.numpy(), expected[f"forward/head{i}"], atol=1e-5)
    logits = reference_model.router_logits
    assert len(logits) == 2
    for i, layer_logits in enumerate(logits):
        np.testing.assert_allclose(layer_logits.numpy(), expected[f"forward/router_logits{i}"], atol=1e-5)


def test_training_loss_matches_the_reference(reference_model, expected):
    x, labels, mask = (torch.tensor(expected[f"loss/{k}"]) for k in ("input_ids", "labels", "loss_masks"))
    with torch.no_grad():
        masked = reference_model.loss(x, labels, mask)
        plain = reference_model.loss(x, labels)
    assert masked.loss.item() == pytest.approx(expected["loss/loss_masked"].item(), rel=1e-5)
    assert plain.loss.item() == pytest.approx(expected["loss/loss_unmasked"].item(), rel=1e-5)
    assert plain.aux_loss.item() == pytest.approx(expected["loss/aux"].item(), rel=1e-5)
    assert plain.loss.item() == pytest.approx(plain.ar_loss.item() + 0.02 * plain.aux_loss.item(), rel=1e-6)


# -- reference checkpoint layout --------------------------------------------------------------------

def test_reference_adapter_writes_the_reference_key_names():
    model = TimeMoE(**TINY)
    expected = {"model.embed_layer.emb_layer.weight", "model.embed_layer.gate_layer.weight", "model.norm.weight"}
    expected |= {f"lm_heads.{j}.out_layer.weight" for j in range(3)}
    for i in range(2):
        p = f"model.layers.{i}."
        expected |= {p + f"self_attn.{n}_proj.{w}" for n in "qkv" for w in ("weight", "bias")}
        expected |= {p + "self_attn.o_proj.weight", p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        expected |= {p + "ffn_layer.gate.weight", p + "ffn_layer.shared_expert_gate.weight"}
        expected |= {p + f"ffn_layer.shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")}
        expected |= {p + f"ffn_layer.experts.{j}.{n}_proj.weight" for j in range(4) for n in ("gate", "up", "down")}
    own = model.state_dict()
    assert "model.layers.0.ffn_layer.experts.w_in" in own  # the module's state dict is its parameters
    state = to_reference(own)
    assert set(state) == expected
    assert from_reference(state).keys() == own.keys()
    assert all(torch.equal(from_reference(state)[k], v) for k, v in own.items())
    assert state["model.layers.0.ffn_layer.experts.3.gate_proj.weight"].shape == (32, 32)  # 64 // k
    assert state["model.layers.0.ffn_layer.experts.3.down_proj.weight"].shape == (32, 32)
    assert state["model.layers.0.ffn_layer.shared_expert.up_proj.weight"].shape == (64, 32)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # 2 KV heads of 8
    assert state["lm_heads.2.out_layer.weight"].shape == (8, 32)


def test_expert_weights_are_stacked_as_the_key_map_says(reference_model):
    ref = load_file(str(REFERENCE / "model.safetensors"))
    ffn = reference_model.model.layers[1].ffn_layer
    p = "model.layers.1.ffn_layer."
    for j in range(4):
        gate, up = ref[f"{p}experts.{j}.gate_proj.weight"], ref[f"{p}experts.{j}.up_proj.weight"]
        assert torch.equal(ffn.experts.w_in[j], torch.cat([gate.t(), up.t()], dim=1))
        assert torch.equal(ffn.experts.w_out[j], ref[f"{p}experts.{j}.down_proj.weight"].t())
    assert torch.equal(ffn.router.gate.weight, ref[p + "gate.weight"])
    assert torch.equal(ffn.shared.fc1.weight, torch.cat([ref[p + "shared_expert.gate_proj.weight"],
                                                         ref[p + "shared_expert.up_proj.weight"]]))
    assert torch.equal(ffn.shared_gate.weight, ref[p + "shared_expert_gate.weight"])
    assert not ffn.router.normalize and ffn.router.k == 2  # softmax top-2, no renormalisation


def test_save_pretrained_round_trip_is_exact(reference_model, tmp_path):
    reference_model.save_pretrained(tmp_path)
    ours, theirs = load_file(str(tmp_path / "model.safetensors")), load_file(str(REFERENCE / "model.safetensors"))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    config, ref_config = json.loads((tmp_path / "config.json").read_text()), json.loads((REFERENCE / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "horizon_lengths", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts", "num_experts_per_tok", "rope_theta", "rms_norm_eps",
                "apply_aux_loss", "use_dense", "model_type", "architectures", "router_aux_loss_factor"):
        assert config[key] == ref_config[key], key
    again = TimeMoE.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), reference_model.parameters()))


def _copy_reference(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(REFERENCE, folder)
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_missing_key_is_a_clear_error_and_changes_nothing(tmp_path):
    folder = _copy_reference(tmp_path, lambda s: s.pop("model.layers.1.ffn_layer.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \['model.layers.1.ffn_layer.experts.2.up_proj.weight'\]"):
        TimeMoE.from_pretrained(folder)
    model = TimeMoE(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from moezoo.zoo import load_checkpoint

    with pytest.raises(CheckpointError, match="experts.2.up_proj"):
        load_checkpoint(model, folder, adapter=REFERENCE_LAYOUT)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_shape_and_unexpected_key_are_clear_errors(tmp_path):
    def widen(state):
        state["model.layers.0.ffn_layer.experts.1.down_proj.weight"] = torch.zeros(32, 33)

    with pytest.raises(CheckpointError, match=r"shape mismatch.*experts.1.down_proj.weight: checkpoint \(32, 33\) vs model \(32, 32\)"):
        TimeMoE.from_pretrained(_copy_reference(tmp_path / "a", widen))
    folder = _copy_reference(tmp_path / "b", lambda s: s.update({"lm_heads.3.out_layer.weight": torch.zeros(2, 32)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['lm_heads.3.out_layer.weight'\]"):
        TimeMoE.from_pretrained(folder)


def test_bad_config_is_a_clear_error(tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(REFERENCE, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type must be 'time_moe'"):
        TimeMoE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "input_size": 3}))
    with pytest.raises(ValueError, match="input_size must be 1"):
        TimeMoE.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        TimeMoE.from_pretrained(tmp_path / "no" / "such" / "folder")


# -- model behaviour ----------------------------------------------------------------------------------

def test_shapes_and_the_reference_init():
    model = TimeMoE(**TINY)
    ffn = model.model.layers[0].ffn_layer
    assert ffn.experts.w_in.shape == (4, 32, 64) and ffn.experts.w_out.shape == (4, 32, 32)
    assert abs(ffn.experts.w_in.std().item() - 0.02) < 0.003 and model.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0
    wide = TimeMoE(**TINY, embed_init_std=1.0).model.embed_layer
    assert 0.7 < wide.gate_layer.weight.std().item() < 1.3 and 0.7 < wide.emb_layer.weight.std().item() < 1.3
    x = torch.randn(3, 20)
    out = model(x)
    assert [tuple(o.shape) for o in out] == [(3, 20, 1), (3, 20, 4), (3, 20, 8)]
    assert [tuple(r.shape) for r in model.router_logits] == [(60, 4), (60, 4)]
    assert model.forecast(x, 11).shape == (3, 11)
    with pytest.raises(ValueError, match="horizon must be an int >= 1"):
        model.forecast(x, 0)
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        TimeMoE(**{**TINY, "num_key_value_heads": 3})


def test_a_change_in_the_future_never_changes_the_past():
    model = random_model(1)
    x = torch.randn(2, 24)
    changed = x.clone()
    changed[:, 15:] = torch.randn(2, 9) * 5
    with torch.no_grad():
        a, b = model(x), model(changed)
    for pa, pb in zip(a, b):
        # Equal up to float rounding (the expert batches differ in size), far apart in the future.
        torch.testing.assert_close(pa[:, :15], pb[:, :15], atol=1e-6, rtol=1e-6)
        assert (pa[:, 15:] - pb[:, 15:]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "horizons, remaining, expected",
    [
        ([1, 8, 32, 64], 96, 64), ([1, 8, 32, 64], 64, 64), ([1, 8, 32, 64], 63, 32), ([1, 8, 32, 64], 31, 8),
        ([1, 8, 32, 64], 8, 8), ([1, 8, 32, 64], 7, 1), ([1, 8, 32, 64], 1, 1),
        ([8, 32], 3, 8),          # the first head even when it is too long (then cut to 3)
        ([1, 8, 4], 10, 4),       # config order: 8 <= 10, then 4 <= 10 -> 4
        ([1, 16, 8], 12, 1),      # config order: stops at 16 > 12 before seeing 8
    ],
)
def test_head_selection_follows_the_reference(horizons, remaining, expected):
    model = TimeMoE(**{**TINY, "horizon_lengths": horizons})
    assert horizons[model.select_head(remaining)] == expected


def test_forecast_steps_through_the_heads_like_the_reference_generate():
    model = random_model(2, horizon_lengths=[1, 8, 32, 64])
    used = []
    for head in model.lm_heads:
        head.register_forward_hook(lambda m, args, out: used.append(out.shape[-1]))
    out = model.forecast(torch.randn(2, 10), 200)
    assert used == [64, 64, 64, 8] and out.shape == (2, 200)
    used.clear()
    model.forecast(torch.randn(2, 10), 3)
    assert used == [1, 1, 1]


def test_kv_cache_equals_recomputing_without_cache():
    model = random_model(3)
    x = torch.randn(2, 30)
    for h in (5, 9, 27):
        torch.testing.assert_close(model.forecast(x, h), model.forecast(x, h, use_cache=False), atol=1e-5, rtol=1e-5)
    cache = KVCache()
    with torch.no_grad():
        pieces = [model.hidden_states(x[:, :17], cache), model.hidden_states(x[:, 17:18], cache),
                  model.hidden_states(x[:, 18:], cache)]
        full = model.hidden_states(x)
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_normalize_z_scores_with_the_unbiased_std_and_undoes_it():
    model = random_model(4)
    x = torch.randn(3, 25) * torch.tensor([[1.0], [50.0], [0.1]]) + torch.tensor([[0.0], [300.0], [-2.0]])
    mean, std = x.mean(1, keepdim=True), torch.tensor([[float(np.std(r, ddof=1))] for r in x.numpy()])
    manual = model.forecast((x - mean) / std, 9) * std + mean
    torch.testing.assert_close(model.forecast(x, 9, normalize=True), manual, atol=1e-4, rtol=1e-5)
    constant = model.forecast(torch.full((1, 10), 7.0), 4, normalize=True)
    assert torch.isfinite(constant).all()


def test_dense_variant_uses_the_reference_names_and_has_no_aux_loss():
    model = TimeMoE(**{**TINY, "use_dense": True})
    keys = set(to_reference(model.state_dict()))
    assert "model.layers.0.ffn_layer.gate_proj.weight" in keys and "model.layers.0.ffn_layer.down_proj.weight" in keys
    assert not any("experts" in k for k in keys)
    out = model.loss(torch.randn(2, 12), torch.randn(2, 12))
    assert out.aux_loss is None and out.loss is out.ar_loss
    model.load_state_dict(from_reference(to_reference(model.state_dict())))


# -- losses against independent formulas ----------------------------------------------------------------

def test_balance_loss_over_all_layers_against_a_loop():
    torch.manual_seed(5)
    layers = [torch.randn(7, 4) * 2, torch.randn(5, 4) * 2]
    probs = [torch.softmax(t, -1) for t in layers]
    tokens = [p for ps in probs for p in ps]
    mean_prob = torch.stack(tokens).mean(0)
    total = 0.0
    for choice in range(2):
        for e in range(4):
            frac = sum(1.0 for p in tokens if torch.argsort(p, descending=True)[choice] == e) / len(tokens)
            total += frac * mean_prob[e].item()
    assert time_moe_balance_loss(layers, k=2).item() == pytest.approx(4 * total, rel=1e-6)
    per_layer = (time_moe_balance_loss(layers[:1], 2) + time_moe_balance_loss(layers[1:], 2)) / 2
    assert per_layer.item() != pytest.approx(4 * total, rel=1e-4)  # one statistic, not a mean of layers
    assert time_moe_balance_loss([torch.zeros(6, 8)], k=2).item() == pytest.approx(2.0)  # k at balance


def test_huber_loss_over_heads_against_a_loop():
    torch.manual_seed(6)
    labels, mask = torch.randn(2, 6) * 3, torch.ones(2, 6)
    mask[1, 4:] = 0
    preds = [torch.randn(2, 6, 1) * 3, torch.randn(2, 6, 3) * 3]

    def huber(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d <= 2.0 else 2.0 * (d - 1.0)

    def head_loss(pred, h, masked):
        num = den = 0.0
        for b in range(2):
            for t in range(6):
                for j in range(h):
                    y = labels[b, t + j].item() if t + j < 6 else 0.0
                    m = (mask[b, t + j].item() if t + j < 6 else 0.0) if masked else 1.0
                    num += m * huber(pred[b, t, j].item(), y)
                    den += m
        return num / den

    for masked in (True, False):
        expected = (head_loss(preds[0], 1, masked) + head_loss(preds[1], 3, masked)) / 2
        got = autoregressive_loss(preds, [1, 3], labels, mask if masked else None)
        assert got.item() == pytest.approx(expected, rel=1e-5)


# -- data ----------------------------------------------------------------------------------------------

def test_kernel_synth_is_deterministic_and_z_scored():
    a, b, c = kernel_synth(6, 128, seed=1), kernel_synth(6, 128, seed=1), kernel_synth(6, 128, seed=2)
    assert a.shape == (6, 128) and a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    np.testing.assert_allclose(a.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(a.std(1), 1, atol=1e-4)


def test_windows_as_the_reference_window_dataset():
    series = [np.arange(10, dtype=np.float32), np.arange(3, dtype=np.float32) + 100]
    ds = WindowDataset(series, max_length=4, stride=3)
    # offsets 0, then range(3, 10 - 5 + 1, 3) = 3: windows [0..4], [3..7]; the short series is padded.
    assert ds.index == [(0, 0), (0, 3), (1, 0)]
    assert ds[1]["input_ids"].tolist() == [3, 4, 5, 6] and ds[1]["labels"].tolist() == [4, 5, 6, 7]
    assert ds[2]["input_ids"].tolist() == [100, 101, 102, 0] and ds[2]["loss_mask"].tolist() == [1, 1, 0, 0]
    fw = ForecastWindows([np.arange(12, dtype=np.float32)], context_length=4, horizon=3)
    assert len(fw) == 12 - 7  # windows end at 7 .. 11, never at the last point (as the reference)
    assert fw[0]["context"].tolist() == [0, 1, 2, 3] and fw[4]["target"].tolist() == [8, 9, 10]
    assert seasonal_naive(torch.arange(6.0).unsqueeze(0), 4, 6).tolist() == [[2, 3, 4, 5, 2, 3]]


def test_builtin_real_series_ship_with_pip_packages():
    series = {s.name: s for s in load_real_series()}
    # Lengths of the packaged data sets (pmdarima's taylor and sunspots, statsmodels' co2 and elnino).
    assert {name: len(s.values) for name, s in series.items()} == {
        "taylor": 4032, "co2": 2284, "sunspots": 2820, "elnino": 732}
    assert all(np.isfinite(s.values).all() for s in series.values())  # co2's gaps are interpolated
    assert (series["taylor"].season, series["co2"].season, series["sunspots"].season) == (48, 52, 12)


def test_zero_shot_mase_against_a_loop():
    values = np.sin(np.arange(300) * 2 * np.pi / 12) * 3 + np.arange(300) * 0.05
    one = RealSeries("toy", values, season=12, horizon=10, description="a sine on a trend")
    model = random_model(3)
    metrics = evaluate_zero_shot(model, context_length=64, test_fraction=0.2, series=[one])
    mase, naive = [], []
    for origin in range(300 - 60, 300 - 10 + 1, 10):  # the last 20 %: origins 240, 250, ..., 290
        context = torch.tensor(values[origin - 64 : origin], dtype=torch.float32)
        target = torch.tensor(values[origin : origin + 10], dtype=torch.float32)
        scale = np.mean([abs(context[t] - context[t - 12]) for t in range(12, 64)])
        mean, std = context.mean(), context.std()
        ours = model.forecast(((context - mean) / std)[None], 10)[0] * std + mean
        mase.append(float((ours - target).abs().mean()) / scale)
        naive.append(float((context[-12:].repeat(2)[:10] - target).abs().mean()) / scale)
    assert metrics["examples"] == 6
    assert metrics["mase/toy"] == pytest.approx(np.mean(mase), rel=1e-5)
    assert metrics["seasonal_naive_mase/toy"] == pytest.approx(np.mean(naive), rel=1e-5)
    assert metrics["relative_mase"] == pytest.approx(np.mean(mase) / np.mean(naive), rel=1e-5)


def test_csv_borders_as_the_reference_benchmark():
    assert csv_borders("data/ETTh1.csv", 17420, 512) == ([0, 8640 - 512, 11520 - 512], [8640, 11520, 14400])
    assert csv_borders("ETTm2.csv", 69680, 96) == ([0, 34560 - 96, 46080 - 96], [34560, 46080, 57600])
    assert csv_borders("weather.csv", 1000, 50) == ([0, 650, 750], [700, 800, 1000])


def _write_csv(path: Path, rows: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    values = np.stack([np.sin(2 * np.pi * t / 24 + c) * (c + 1) + 0.1 * rng.standard_normal(rows) + 5 * c
                       for c in range(channels)], axis=1)
    lines = ["date," + ",".join(f"ch{c}" for c in range(channels))]
    lines += [f"2020-01-01 {i}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(values)]
    path.write_text("\n".join(lines) + "\n")
    return np.array([[float(f"{v:.6f}") for v in row] for row in values])


def test_csv_evaluation_follows_the_paper_protocol(tmp_path):
    path = tmp_path / "toy.csv"
    values = _write_csv(path, 3900)
    model = random_model(7, num_hidden_layers=1, horizon_lengths=[1, 96, 192])
    result = evaluate_csv(model, path, stride=97, batch_size=64)
    assert set(result) >= {"mse/96", "mae/720", "mse", "mae", "windows/336"}
    # Independent recomputation for horizon 336 (context 2048): scaler on the first 70%, test rows.
    from sklearn.preprocessing import StandardScaler

    n_train, n_test = int(3900 * 0.7), int(3900 * 0.2)
    scaled = StandardScaler().fit(values[:n_train]).transform(values).astype(np.float32)
    block = scaled[3900 - n_test - 2048:]
    ends = list(range(2048 + 336, len(block), 97))
    assert result["windows/336"] == 2 * len(ends)
    errors = []
    for c in range(2):
        context = torch.tensor(np.stack([block[e - 336 - 2048 : e - 336, c] for e in ends]))
        target = torch.tensor(np.stack([block[e - 336 : e, c] for e in ends]))
        errors.append(model.forecast(context, 336) - target)
    err = torch.cat(errors)
    assert result["mse/336"] == pytest.approx(err.pow(2).mean().item(), rel=1e-4)
    assert result["mae/336"] == pytest.approx(err.abs().mean().item(), rel=1e-4)
    assert result["mse"] == pytest.approx(np.mean([result[f"mse/{h}"] for h in (96, 192, 336, 720)]))


def test_csv_data_module_and_the_task_test_step(tmp_path):
    import lightning as L

    from moezoo.modalities.timeseries import Forecasting

    path = tmp_path / "toy.csv"
    _write_csv(path, 600)
    dm = SeriesDataModule(source="csv", path=str(path), max_length=32, context_length=32, horizon=8, test_stride=40,
                          batch_size=4)
    dm.setup()
    # 420 train rows per channel: offsets 0, 32, ..., while a 33-point window still fits.
    assert len(dm.splits["train"]) == 2 * (1 + (420 - 33) // 32) and dm.splits["test"][0]["context"].shape == (32,)
    task = Forecasting(random_model(8, num_hidden_layers=1))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert metrics["test/mse"] > 0 and metrics["test/mae"] > 0


def test_too_few_training_windows_for_a_batch_is_a_clear_error(tmp_path):
    path = tmp_path / "toy.csv"
    _write_csv(path, 600)  # 420 train rows per channel, 2 channels: 2 windows of 257 points
    dm = SeriesDataModule(source="csv", path=str(path), max_length=256, context_length=32, horizon=8, batch_size=4)
    with pytest.raises(ValueError, match=r"2 windows of max_length=256 \(stride=256\), fewer than batch_size=4"):
        dm.setup()
    assert dm.splits == {}  # nothing half-built: a retry fails the same way
    with pytest.raises(ValueError, match="fewer than batch_size"):
        dm.setup()


# -- zoo and CLI ---------------------------------------------------------------------------------------

def _fake_hub_cache(root: Path, repo: str) -> None:
    """A Hugging Face cache holding ``repo`` as the hub would leave it (refs/main + snapshot)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(REFERENCE, folder / "snapshots" / commit, ignore=shutil.ignore_patterns("expected.npz"))


def test_hub_entries_load_through_huggingface_hub_offline(tmp_path, monkeypatch, expected):
    import huggingface_hub.constants as hub

    _fake_hub_cache(tmp_path, "Maple728/TimeMoE-50M")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    for size, width in (("50m", 384), ("200m", 768)):
        entry = get_entry(f"time_moe_{size}")
        assert entry.pretrained_cfg.source == f"hf-hub:Maple728/TimeMoE-{size.upper()}"
        assert entry.default_args["hidden_size"] == width and entry.default_args["horizon_lengths"] == [1, 8, 32, 64]
    # The 50M entry's hub path, with the tiny architecture of the fake snapshot.
    overrides = {k: v for k, v in TINY.items() if k != "backend"}
    model = create_model("time_moe_50m", pretrained=True, **overrides).eval()
    context = torch.tensor(expected["context"])
    np.testing.assert_allclose(model.forecast(context, 17).numpy(), expected["generate/17"], atol=1e-5)
    by_id = TimeMoE.from_pretrained("Maple728/TimeMoE-50M").eval()
    np.testing.assert_allclose(by_id.forecast(context, 9).numpy(), expected["generate/9"], atol=1e-5)


@pytest.mark.parametrize("name, total, active", [("time_moe_50m", 113.4e6, 49.7e6), ("time_moe_200m", 453.2e6, 198.4e6)])
def test_hub_entry_sizes_are_the_papers(name, total, active):
    from moezoo.layers import parameter_counts

    entry = get_entry(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = entry.builder(**entry.default_args)
    counts = parameter_counts(model)
    # Time-MoE (arXiv 2409.16040), its table of model configurations: Time-MoE_base 113M total / 50M
    # activated, Time-MoE_large 453M / 200M.
    assert counts["total"] == pytest.approx(total, rel=1e-3) and counts["active"] == pytest.approx(active, rel=1e-3)


def test_shipped_tiny_entry_reproduces_its_card():
    assert get_entry("time_moe_tiny").pretrained_cfg is not None  # the weights ship with the package
    from moezoo.modalities.timeseries import evaluate_zero_shot

    model = create_model("time_moe_tiny", pretrained=True)
    recorded = json.loads((ROOT / "model_cards" / "results" / "time_moe_tiny.json").read_text())["metrics"]
    metrics = evaluate_zero_shot(model)
    assert metrics["relative_mase"] == pytest.approx(recorded["relative_mase"], rel=1e-4)
    assert metrics["mase"] < metrics["seasonal_naive_mase"] and metrics["relative_mase"] < 1.0


def test_two_step_fit_through_the_cli(tmp_path):
    from tests.cli_fit import assert_two_warmup_steps, train_losses, two_step_fit

    checkpoint, rows = two_step_fit(
        "timeseries/time_moe_tiny", tmp_path, "--data.init_args.num_series", "8",
        "--data.init_args.series_length", "80", "--data.init_args.max_length", "32", "--data.init_args.val_series", "2",
        "--data.init_args.batch_size", "4")
    assert_two_warmup_steps(checkpoint, lr=0.01, warmup_steps=50)  # the config's lr and warmup_steps
    losses = [train_losses(rows, f"train/{key}_step") for key in ("loss", "ar_loss", "balance_loss")]
    assert len(losses[0]) == 2
    for total, ar, balance in zip(*losses):
        # The reference objective (Time-MoE/Time-MoE time_moe/models/modeling_time_moe.py,
        # TimeMoeForPrediction.forward: loss += router_aux_loss_factor * temporal_aux_loss), with the
        # factor 0.02 of the public checkpoints' config.json.
        assert total == pytest.approx(ar + 0.02 * balance, rel=1e-5)
        # E * sum_j sum_e f_je * P_e is k = 2 when P_e = 1/E, and the untrained router (weights
        # N(0, 0.02)) is almost uniform.
        assert balance == pytest.approx(2.0, abs=0.1)
