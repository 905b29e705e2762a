"""Reliability: property-based checks of routers and layers, non-finite input handling, a soak with
no memory growth, low precision, and an interrupted `moezoo fit` resuming to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moezoo import routers as R
from moezoo.layers import MoE, SoftMoE, aux_loss
from moezoo.zoo import load_checkpoint, read_state_dict

ROOT = Path(__file__).resolve().parents[1]

ROUTERS = {
    "top_k": lambda d, e, k: R.TopKRouter(d, e, k=k),
    "top_k_capacity": lambda d, e, k: R.TopKRouter(d, e, k=k, capacity_factor=0.5, noisy=True, jitter=0.1),
    "mixtral": lambda d, e, k: R.TopKRouter(d, e, k=k, order="topk_softmax"),
    "bpr": lambda d, e, k: R.BatchPrioritizedRouter(d, e, k=k, capacity_factor=0.3, group_size=4),
    "expert_choice": lambda d, e, k: R.ExpertChoiceRouter(d, e, capacity_factor=0.5),
    "hash": lambda d, e, k: R.HashRouter(d, e, key="position"),
    "base": lambda d, e, k: R.BalancedAssignmentRouter(d, e),
    "sinkhorn": lambda d, e, k: R.SinkhornRouter(d, e, k=k),
    "sigmoid": lambda d, e, k: R.SigmoidRouter(d, e, k=k, bias_update_rate=0.01),
    # One group of all experts, so that any k <= E is allowed.
    "group_limited": lambda d, e, k: R.GroupLimitedRouter(d, e, k=k, num_groups=1, topk_group=1, group_top=1,
                                                          bias_update_rate=0.01),
    "dense_training": lambda d, e, k: R.DenseTrainingRouter(d, e, k=k),
    "forced_balance": lambda d, e, k: R.ForcedBalanceRouter(d, e, k=k),
    "dselect_k": lambda d, e, k: R.DSelectKRouter(d, e, k=k),
    "sparse_mixer": lambda d, e, k: R.SparseMixerRouter(d, e),
}
#: Routers that need more than one expert (DSelect-k's binary codes; SparseMixer's fixed top-2).
MIN_EXPERTS = {"dselect_k": 2, "sparse_mixer": 2}


@settings(max_examples=60, deadline=None)
@given(
    router=st.sampled_from(sorted(ROUTERS)),
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    dim=st.integers(1, 8),
    experts=st.integers(1, 6),
    k=st.integers(1, 3),
    gated=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    training=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_moe_outputs_finite_for_any_allowed_shape(router, batch, seq, dim, experts, k, gated, scale, training, seed):
    torch.manual_seed(seed)
    experts = max(experts, MIN_EXPERTS.get(router, 1))
    k = 2 if router == "sparse_mixer" else min(k, experts)
    layer = MoE(dim, 5, experts, ROUTERS[router](dim, experts, k), gated=gated, activation="silu")
    layer.train(training)
    x = (torch.randn(batch, seq, dim) * scale).requires_grad_()
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (out.sum() + aux_loss(layer, {name: 0.1 for name in layer.last_losses})).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    stats = layer.last_stats
    assert 0.0 <= float(stats["dropped_fraction"]) <= 1.0
    # DSelect-k's smooth selectors and DS-MoE's dense training may reach every expert.
    per_token = experts if router in ("dselect_k", "dense_training") else max(k, 1) * (3 if router == "expert_choice" else 1)
    assert stats["tokens_per_expert"].sum() <= batch * seq * per_token


@settings(max_examples=20, deadline=None)
@given(groups=st.integers(1, 3), tokens=st.integers(1, 9), dim=st.integers(1, 8), experts=st.integers(1, 5),
       slots=st.integers(1, 3), seed=st.integers(0, 1000))
def test_soft_moe_outputs_finite(groups, tokens, dim, experts, slots, seed):
    torch.manual_seed(seed)
    out = SoftMoE(dim, 4, experts, slots)(torch.randn(groups, tokens, dim) * 10)
    assert out.shape == (groups, tokens, dim) and torch.isfinite(out).all()


#: Routers built for their own layers (attention, speech): checked for bad input too.
LAYER_ROUTERS = {
    "moa": lambda d, e, k: R.MoARouter(d, e, k=k),
    "sigma_moe": lambda d, e, k: R.SigmaMoERouter(d, e, k=k),
    "switchhead": lambda d, e, k: R.SwitchHeadSelector(d, 2, e, k=k),
    "speech_moe": lambda d, e, k: R.SpeechMoERouter(d - 2, e, embed_dim=2, k=k),
}


@pytest.mark.parametrize("name", sorted(ROUTERS) + sorted(LAYER_ROUTERS))
def test_routers_reject_bad_input_with_named_errors(name):
    router = {**ROUTERS, **LAYER_ROUTERS}[name](4, 3, 1)
    assert router(torch.randn(3, 4), positions=torch.zeros(3, dtype=torch.long)).expert.numel() > 0  # a valid input routes
    for bad, message in ((torch.randn(5), "shape"), (torch.randn(5, 7), "dim"), (torch.zeros(0, 4), "no tokens")):
        with pytest.raises(ValueError, match=message):
            router(bad, positions=torch.zeros(bad.shape[0] if bad.dim() else 1, dtype=torch.long))
    positions = torch.zeros(3, dtype=torch.long)  # what the hash router routes by
    with pytest.raises(ValueError, match="not finite"):
        router(torch.full((3, 4), float("nan")), positions=positions)
    with pytest.raises(ValueError, match="floating"):
        router(torch.ones(3, 4, dtype=torch.long), positions=positions)


def test_nonfinite_steps_are_skipped_when_configured():
    from moezoo.modalities.vision import ImageClassification, VisionTransformerMoE

    model = VisionTransformerMoE(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=2,
                                 num_heads=2, num_experts=2)
    strict = ImageClassification(model)
    with pytest.raises(ValueError, match="not finite"):
        strict.training_step((torch.full((2, 1, 16, 16), float("nan")), torch.zeros(2, dtype=torch.long)), 0)
    tolerant = ImageClassification(model, nonfinite="skip")
    with pytest.warns(UserWarning, match="non-finite loss"):
        result = tolerant.training_step((torch.full((2, 1, 16, 16), float("nan")), torch.zeros(2, dtype=torch.long)), 0)
    assert result is None and tolerant.skipped_steps == 1
    assert torch.isfinite(tolerant.training_step((torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long)), 0))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_soak_2000_steps_without_memory_growth():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    names = sorted(ROUTERS)
    layers = {n: MoE(16, 32, 4, ROUTERS[n](16, 4, 2)) for n in names}
    params = [p for layer in layers.values() for p in layer.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    samples = []
    for step in range(2000):
        layer = layers[names[step % len(names)]]
        tokens = int(torch.randint(1, 96, (1,), generator=generator))
        out = layer(torch.randn(tokens, 16, generator=generator))
        (out.pow(2).mean() + aux_loss(layer, {n: 0.01 for n in layer.last_losses})).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (200, 1999):
            samples.append(_rss_mb())
    assert samples[1] - samples[0] < 20.0, samples  # MiB; a leak of one step's graph would exceed it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(ROUTERS) + sorted(LAYER_ROUTERS))
def test_routing_math_is_fp32_under_autocast(name, dtype):
    router = {**ROUTERS, **LAYER_ROUTERS}[name](8, 4, 2 if name != "speech_moe" else 1)
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.nn.Linear(8, 8)(x).dtype == dtype  # autocast is on
        routing = router(x, positions=torch.arange(16))
    assert routing.weight.dtype == torch.float32
    assert routing.logits is None or routing.logits.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in routing.losses.values())


def test_router_stays_fp32_under_bf16_and_z_loss_bounds_logits():
    torch.manual_seed(0)

    def train(z_weight: float) -> float:
        layer = MoE(8, 16, 4, R.TopKRouter(8, 4, k=1))
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        for _ in range(150):
            x = torch.randn(64, 8)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            assert layer.router.compute_logits(x).dtype == torch.float32
            # an objective that rewards large router logits pushes them up; z-loss holds them back
            loss = (out.float().pow(2).mean() - 0.1 * torch.logsumexp(layer.router.compute_logits(x), -1).mean()
                    + z_weight * layer.last_losses["z_loss"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return layer.router.compute_logits(torch.randn(256, 8)).abs().max().item()

    unbounded, bounded = train(0.0), train(1.0)
    assert bounded < 0.5 * unbounded


FAST = ["--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false"]


def _fit(tmp: Path, *extra: str, precision: str = "32-true") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moezoo.cli", "fit", "--config", str(ROOT / "configs/vision/vmoe_ti_digits.yaml"),
         "--trainer.precision", precision, "--trainer.default_root_dir", str(tmp), *FAST, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow  # two 60-step fits
def test_bf16_training_has_no_nan_and_tracks_fp32(tmp_path):
    steps = ["--trainer.max_steps", "30", "--trainer.enable_checkpointing", "true",
             "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
             "--trainer.callbacks.dirpath"]
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        out = tmp_path / precision
        result = _fit(out, *steps, str(out), precision=precision)
        assert result.returncode == 0, result.stderr[-3000:]
        model = __import__("moezoo").create_model("vmoe_ti_digits")
        load_checkpoint(model, next(out.glob("*.ckpt")))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        from moezoo.modalities.vision.evaluate import evaluate_digits

        losses[precision] = evaluate_digits(model)["loss"]
    # stated bound: after 30 steps the bf16 model's test loss is within 10 % of the fp32 model's
    assert abs(losses["bf16-mixed"] - losses["32-true"]) <= 0.1 * losses["32-true"], losses


CHECKPOINT_CFG = """
trainer:
  max_steps: 25
  callbacks:
  - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    init_args:
      dirpath: {dirpath}
      every_n_train_steps: 5
      save_top_k: -1
      filename: "{{step}}"
"""


@pytest.mark.slow  # three fits in subprocesses, one killed (~2 min on 2 cores)
def test_killed_fit_resumes_to_the_same_weights_and_metrics(tmp_path):
    """Kill `moezoo fit` mid-epoch (19 batches per epoch), resume from its last checkpoint, and end
    where an uninterrupted run ends: same weights (bit for bit), optimiser state, schedule and metrics."""
    configs = {}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        configs[name] = tmp_path / name / "ckpt.yaml"
        configs[name].write_text(CHECKPOINT_CFG.format(dirpath=tmp_path / name))
    base = [sys.executable, "-m", "moezoo.cli", "fit", "--config", str(ROOT / "configs/vision/vmoe_ti_digits.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    straight = subprocess.run([*base, "--config", str(configs["straight"]), *FAST], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    victim = subprocess.Popen([*base, "--config", str(configs["killed"]), *FAST], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "step=15.ckpt").exists():  # step 10's file is then complete
        assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for late in ("step=20.ckpt", "step=25.ckpt"):
        (tmp_path / "killed" / late).unlink(missing_ok=True)

    resumed = subprocess.run([*base, "--config", str(configs["killed"]), *FAST,
                              "--ckpt_path", str(tmp_path / "killed" / "step=10.ckpt")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = read_state_dict(tmp_path / "straight" / "step=25.ckpt")
    b = read_state_dict(tmp_path / "killed" / "step=25.ckpt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # The optimiser moments and the learning-rate schedule went on as if nothing had happened ...
    ca, cb = (torch.load(tmp_path / run / "step=25.ckpt", map_location="cpu", weights_only=True)
              for run in ("straight", "killed"))
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    moments_a, moments_b = (c["optimizer_states"][0]["state"] for c in (ca, cb))
    assert moments_a.keys() == moments_b.keys() and all(
        torch.equal(moments_a[i][name], moments_b[i][name]) for i in moments_a for name in moments_a[i])
    # ... and the final model scores the same.
    from moezoo.modalities.vision.evaluate import evaluate_digits

    models = []
    for state in (a, b):
        model = __import__("moezoo").create_model("vmoe_ti_digits")
        model.load_state_dict(state)
        models.append(model)
    assert evaluate_digits(models[0]) == evaluate_digits(models[1])


def test_config_naming_an_unknown_class_fails_before_anything_is_written(tmp_path, capsys):
    from moezoo.cli import main

    bad = tmp_path / "bad.yaml"
    root = tmp_path / "run"
    text = (ROOT / "configs/vision/vmoe_ti_digits.yaml").read_text()
    bad.write_text(text.replace("moezoo.modalities.vision.VisionTransformerMoE", "moezoo.modalities.vision.NoSuchModel"))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(bad), "--trainer.default_root_dir", str(root)])
    assert info.value.code != 0
    assert "NoSuchModel" in capsys.readouterr().err
    assert not root.exists()


def test_corrupted_lightning_checkpoint_is_refused_and_changes_nothing(tmp_path):
    import moezoo
    from moezoo.zoo import CheckpointError

    model = moezoo.create_model("vmoe_ti_digits")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, good)
    corrupt = tmp_path / "corrupt.ckpt"
    data = bytearray(good.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    corrupt.write_bytes(bytes(data[: len(data) - 100]))
    with pytest.raises(CheckpointError, match="cannot read Lightning checkpoint"):
        load_checkpoint(model, corrupt)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "payload": Path("/")}, pickled)  # arbitrary object: refused by weights_only
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(model, pickled)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
