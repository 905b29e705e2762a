"""Expert parallelism on 2 gloo processes equals the single-process layer, outputs and gradients;
2-process `moezoo fit` runs under DDP (with and without expert parallelism) and FSDP."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_router(case: str, dim: int, experts: int):
    from moezoo.routers import ExpertChoiceRouter, TopKRouter

    if case == "top2":
        return TopKRouter(dim, experts, k=2)
    if case == "top2_capacity":
        return TopKRouter(dim, experts, k=2, capacity_factor=0.75)
    return ExpertChoiceRouter(dim, experts, capacity_factor=2.0)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _assert_grads_match(model, single, sharded: set[str], groups, label: str = "") -> None:
    """Replicated parameters: the rank's own gradient. Expert shards: the gradient that the
    expert-parallel group's tokens give the single-process model, cut to this rank's shard."""
    from moezoo.layers.expert_parallel import expert_shards

    shards = expert_shards(model)
    reference = dict(single.named_parameters())
    for name, p in model.named_parameters():
        expected = reference[name].grad
        if name in sharded:
            expected = expected.clone()
            dist.all_reduce(expected, group=groups.group)  # the experts see their group's tokens
            start, count, _ = shards[name]
            expected = expected[start : start + count]
        if p.grad is None:
            assert expected is None or not expected.any(), name
            continue
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{label} {name}: {m}")


def _worker(rank: int, world: int, port: int, case: str, size: int) -> None:
    _init(rank, world, port)
    try:
        from moezoo.layers import MoE
        from moezoo.layers.expert_parallel import init_expert_parallel, shard_experts

        torch.manual_seed(0)
        dim, experts = 6, 4
        layer = MoE(dim, 10, experts, make_router(case, dim, experts), gated=(case == "top2"),
                    activation="silu" if case == "top2" else "gelu")
        inputs = torch.randn(world, 13, dim)
        grad_out = torch.randn(world, 13, dim)
        x = inputs[rank].clone().requires_grad_()

        single = copy.deepcopy(layer)
        expected = single(x)
        expected.backward(grad_out[rank])
        x_grad_expected = x.grad.clone()
        x.grad = None

        groups = init_expert_parallel(size)  # world = (world // size) replicas x size expert shards
        shard_experts(layer, groups)
        out = layer(x)
        out.backward(grad_out[rank])

        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(x.grad, x_grad_expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.router.gate.weight.grad, single.router.gate.weight.grad)
        local, shard = experts // size, rank % size
        for name, p in layer.experts.named_parameters():
            full = getattr(single.experts, name).grad.clone()
            in_group = full.clone()
            dist.all_reduce(in_group, group=groups.group)  # the experts see their group's tokens
            mine = slice(shard * local, (shard + 1) * local)
            torch.testing.assert_close(p.grad, in_group[mine], atol=1e-6, rtol=1e-5)
            if groups.replicas is not None:  # what ExpertParallel does before the optimiser step
                dist.all_reduce(p.grad, group=groups.replicas)
            dist.all_reduce(full)  # every rank's tokens
            torch.testing.assert_close(p.grad, full[mine], atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["top2", "top2_capacity", "expert_choice"])
def test_expert_parallel_equals_single_process(case):
    mp.spawn(_worker, args=(2, free_port(), case, 2), nprocs=2, join=True)


def test_expert_parallel_composes_with_data_parallel_replicas():
    # 4 ranks: 2 replicas x 2 expert shards; gradients reduced over the replicas equal the single layer's.
    mp.spawn(_worker, args=(4, free_port(), "top2", 2), nprocs=4, join=True)


def _family_worker(rank: int, world: int, port: int, families: list[str]) -> None:
    _init(rank, world, port)
    try:
        from moezoo.layers.expert_parallel import expert_banks, init_expert_parallel, shard_experts
        from tests.distributed.families import FAMILIES

        groups = init_expert_parallel(world)
        for family, capacity in [(f, c) for f in families for c in (False, True)]:
            build, objective = FAMILIES[family]
            torch.manual_seed(0)
            model = build(capacity).train()
            single = copy.deepcopy(model)
            torch.manual_seed(7 + rank)  # router noise: the same draws in both runs
            expected = objective(single, rank)
            expected.backward()
            sharded = set(shard_experts(model, groups))
            assert all(bank.num_local_experts == bank.num_experts // world for _, bank in expert_banks(model))
            torch.manual_seed(7 + rank)
            loss = objective(model, rank)
            loss.backward()
            torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5, msg=f"{family}, capacity={capacity}")
            _assert_grads_match(model, single, sharded, groups, f"{family}, capacity={capacity}:")
    finally:
        dist.destroy_process_group()


def test_every_family_expert_parallel_equals_single_process():
    """V-MoE, Soft MoE, LIMoE, Time-MoE, SpeechMoE and the σ-MoE LM (with SwitchHead attention):
    outputs (the objective) and every gradient on 2 gloo processes, token dropping on and off. One
    pair of processes runs them all (process start-up dominates the cost)."""
    families = ["vmoe", "soft_moe", "limoe", "time_moe", "speech_moe", "sigma_moe_lm"]
    mp.spawn(_family_worker, args=(2, free_port(), families), nprocs=2, join=True)


@pytest.mark.slow  # each spawned process imports transformers
def test_converted_transformers_models_expert_parallel_equal_single_process():
    """Converted Mixtral and DeepSeek-V3 blocks: outputs and every gradient on 2 gloo processes."""
    mp.spawn(_family_worker, args=(2, free_port(), ["mixtral_hf", "deepseek_v3_hf"]), nprocs=2, join=True)


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from moezoo.layers.expert_parallel import init_expert_parallel, shard_experts
        from tests.distributed.families import FAMILIES

        build, objective = FAMILIES["vmoe"]
        torch.manual_seed(0)
        model = build(True).train()
        single = copy.deepcopy(model)
        for r in range(world):  # one process on the union of the ranks' batches: the mean gradient
            torch.manual_seed(7 + r)
            (objective(single, r) / world).backward()
        groups = init_expert_parallel(world)
        sharded = set(shard_experts(model, groups))
        experts = [p for n, p in model.named_parameters() if n in sharded]
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:  # as MoETask.configure_model: expert shards stay whole
            fully_shard(block, mesh=mesh, ignored_params=set(experts))
        fully_shard(model, mesh=mesh, ignored_params=set(experts))
        torch.manual_seed(7 + rank)
        objective(model, rank).backward()
        for p in experts:  # what ExpertParallel does before the optimiser step
            p.grad.div_(world)
        from moezoo.layers.expert_parallel import expert_shards

        shards = expert_shards(model)
        reference = dict(single.named_parameters())
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            expected = reference[name].grad
            if name in shards:
                start, count, _ = shards[name]
                expected = expected[start : start + count]
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def test_expert_parallel_with_fsdp2_equals_single_process():
    mp.spawn(_fsdp_worker, args=(2, free_port()), nprocs=2, join=True)


FIT = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
       "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
       "--trainer.devices", "2"]


def run_fit(tmp_path: Path, config: str, *extra: str) -> subprocess.CompletedProcess:
    """``moezoo fit --config config`` on 2 CPU processes; ``extra`` overrides the defaults above."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    return subprocess.run(
        [sys.executable, "-m", "moezoo.cli", "fit", "--config", str(ROOT / config), *FIT,
         "--trainer.default_root_dir", str(tmp_path), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    # FSDP2 (fully_shard) through Lightning's ModelParallelStrategy: Lightning's FSDPStrategy needs a GPU.
    "fsdp": ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
             "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"],
}


#: One tiny config per task.
TASK_CONFIGS = {
    "configs/vision/vmoe_ti_digits.yaml": [],
    "configs/language_image/limoe_ti_glyphs.yaml": [],
    "configs/text/lm_switchhead_pydoc.yaml": [],
    "configs/speech/speechmoe_tiny_espeak.yaml": [],
    # A small synthetic corpus: drawing the config's 2,000 Gaussian-process series of 1,024 points is slow.
    "configs/timeseries/time_moe_tiny.yaml": [
        "--data.init_args.num_series", "16", "--data.init_args.series_length", "96", "--data.init_args.max_length",
        "32", "--data.init_args.val_series", "4", "--data.init_args.batch_size", "4",
    ],
}


# Each case is a 2-process Lightning fit (~40 s on 2 cores): the default suite runs DDP on V-MoE and
# FSDP on Time-MoE; `-m slow` runs every config under both strategies.
_DEFAULT_FITS = {("ddp", "vmoe_ti_digits"), ("fsdp", "time_moe_tiny")}


@pytest.mark.parametrize("strategy,config", [
    pytest.param(s, c, id=f"{s}-{Path(c).stem}",
                 marks=[] if (s, Path(c).stem) in _DEFAULT_FITS else pytest.mark.slow)
    for s in sorted(STRATEGIES) for c in sorted(TASK_CONFIGS)])
def test_two_process_fit_under_lightning_strategies(tmp_path, strategy, config):
    result = run_fit(tmp_path, config, *STRATEGIES[strategy], "--trainer.enable_checkpointing", "false", *TASK_CONFIGS[config])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "`Trainer.fit` stopped: `max_steps=3` reached" in result.stderr + result.stdout


#: The shipped tiny entries' configs, with the data made small where the config's is slow to build.
SHIPPED_CONFIGS = {
    "configs/vision/vmoe_ti_digits.yaml": [],
    "configs/language_image/limoe_ti_glyphs.yaml": [],
    "configs/timeseries/time_moe_tiny.yaml": TASK_CONFIGS["configs/timeseries/time_moe_tiny.yaml"],
    "configs/speech/speechmoe_tiny_espeak.yaml": [],
    "configs/text/lm_sigma_moe_pydoc.yaml": [],
}
EXPERT_PARALLEL = ["--trainer.strategy", "ddp", "--trainer.callbacks+=moezoo.distributed.ExpertParallel",
                   "--trainer.callbacks.size", "2"]


def _checkpoints_every_2_steps(folder: Path) -> list[str]:
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
            str(folder), "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.save_top_k", "-1",
            "--trainer.callbacks.filename", "{step}"]


def _fit_4_steps(folder: Path, config: str, *extra: str) -> subprocess.CompletedProcess:
    return run_fit(folder, config, *SHIPPED_CONFIGS[config], *EXPERT_PARALLEL,
                   *_checkpoints_every_2_steps(folder / "ckpt"), "--trainer.max_steps", "4",
                   "--trainer.limit_val_batches", "0", "--trainer.gradient_clip_val", "0.5", *extra)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("config", [pytest.param(c, marks=[] if "vmoe" in c else pytest.mark.slow)
                                    for c in SHIPPED_CONFIGS], ids=lambda c: Path(c).stem)
def test_expert_parallel_fit_resumes_bit_identically_and_loads_in_one_process(tmp_path, config):
    """2 processes, DDP x expert parallelism P=2, clipping by norm: a run resumed from its step-2
    checkpoint ends with the same weights, optimiser state and routing biases as the unbroken run;
    its checkpoints hold every expert and load into a single-process model."""
    unbroken = _fit_4_steps(tmp_path / "a", config)
    assert unbroken.returncode == 0, unbroken.stderr[-4000:]
    resumed = _fit_4_steps(tmp_path / "b", config, "--ckpt_path", str(tmp_path / "a" / "ckpt" / "step=2.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = _state(tmp_path / "a" / "ckpt" / "step=4.ckpt"), _state(tmp_path / "b" / "ckpt" / "step=4.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for index, entry in opt_a["state"].items():
            for name, value in entry.items():
                assert torch.equal(value, opt_b["state"][index][name]), (index, name)

    from moezoo.lightning_cli import MoezooCLI
    from moezoo.zoo import load_checkpoint

    cli = MoezooCLI(args=["--config", str(ROOT / config), *SHIPPED_CONFIGS[config]], run=False)
    single = cli.model.model
    load_checkpoint(single, tmp_path / "a" / "ckpt" / "step=4.ckpt")  # every expert, one process
    assert all(torch.equal(v, a["state_dict"]["model." + k]) for k, v in single.state_dict().items())


def _clip_worker(rank: int, world: int, port: int, size: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from types import SimpleNamespace

        from moezoo.distributed import ExpertParallel
        from moezoo.layers import MoE
        from moezoo.layers.expert_parallel import init_expert_parallel, shard_experts
        from moezoo.routers import TopKRouter

        torch.manual_seed(0)
        layer = MoE(6, 10, 4, TopKRouter(6, 4, k=2), gated=True, activation="silu")
        inputs, grad_out = torch.randn(world, 13, 6), torch.randn(world, 13, 6)

        # One process: the mean of every rank's gradient (what DDP gives), clipped by its norm.
        single = copy.deepcopy(layer)
        for r in range(world):
            single(inputs[r]).backward(grad_out[r])
        for p in single.parameters():
            p.grad /= world
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in single.parameters()]))
        max_norm = 0.5 * float(norm)  # so that clipping really happens
        torch.nn.utils.clip_grad_norm_(single.parameters(), max_norm)

        sharding = ExpertParallel(size)
        sharding.groups = init_expert_parallel(size)
        sharding.sharded = shard_experts(layer, sharding.groups)
        layer(inputs[rank]).backward(grad_out[rank])
        for name, p in layer.named_parameters():  # DDP averages the replicated parameters
            if name not in sharding.sharded:
                dist.all_reduce(p.grad)
                p.grad /= world
        sharding.on_before_optimizer_step(SimpleNamespace(world_size=world), layer, None)
        total = sharding.clip_grad_norm(layer, max_norm)

        torch.testing.assert_close(total, norm, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.router.gate.weight.grad, single.router.gate.weight.grad)
        local, shard = 4 // size, rank % size
        for name, p in layer.experts.named_parameters():
            expected = getattr(single.experts, name).grad[shard * local : (shard + 1) * local]
            torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_expert_parallel_clips_by_the_whole_models_gradient_norm(world):
    mp.spawn(_clip_worker, args=(world, free_port(), 2), nprocs=world, join=True)


def _bad_input_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    try:
        from moezoo.distributed import ExpertParallel
        from moezoo.layers import MLP, MoE
        from moezoo.layers.expert_parallel import init_expert_parallel, shard_experts
        from moezoo.routers import TopKRouter
        from moezoo.zoo import CheckpointError, load_checkpoint, save_checkpoint

        with pytest.raises(ValueError, match=r"world size 2 must be a multiple of the expert-parallel size P, got P=3"):
            init_expert_parallel(3)
        groups = init_expert_parallel(2)
        model = torch.nn.Sequential(MoE(6, 8, 4), MoE(6, 8, 3, TopKRouter(6, 3, k=1)))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"1\.experts has E=3 experts, which P=2 ranks cannot split"):
            shard_experts(model, groups)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing sharded
        with pytest.raises(ValueError, match="MLP has no expert bank to shard"):
            shard_experts(MLP(6, 8), groups)
        with pytest.raises(ValueError, match=r"size must be an int >= 1, got 0"):
            ExpertParallel(0)

        sharded = torch.nn.Sequential(MoE(6, 8, 4))
        shard_experts(sharded, groups)
        other = torch.nn.Sequential(MoE(6, 8, 6, TopKRouter(6, 6)))  # a checkpoint of 6 experts
        path = Path(os.environ["MOEZOO_TEST_DIR"]) / f"six_experts_{rank}.safetensors"
        save_checkpoint(other, path)
        kept = {k: v.clone() for k, v in sharded.state_dict().items()}
        with pytest.raises(CheckpointError, match=r"0\.experts\.w_in holds 6 experts but the model's bank has E=4"):
            load_checkpoint(sharded, path)
        assert all(torch.equal(kept[k], v) for k, v in sharded.state_dict().items())  # failed load: no change

        torch.manual_seed(3)  # a checkpoint written by one process (P=1) loads at P=2: each rank its shard
        full = torch.nn.Sequential(MoE(6, 8, 4))
        save_checkpoint(full, path)
        load_checkpoint(sharded, path)
        local = slice(2 * groups.rank, 2 * groups.rank + 2)
        assert torch.equal(sharded[0].experts.w_in, full[0].experts.w_in[local])
        assert torch.equal(sharded[0].router.gate.weight, full[0].router.gate.weight)
    finally:
        dist.destroy_process_group()


def test_bad_expert_parallel_input_is_a_clear_error_and_a_one_process_checkpoint_loads_sharded(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEZOO_TEST_DIR", str(tmp_path))
    mp.spawn(_bad_input_worker, args=(2, free_port()), nprocs=2, join=True)
