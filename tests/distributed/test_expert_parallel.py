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


def _worker(rank: int, world: int, port: int, case: str, size: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
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


FIT = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
       "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
       "--trainer.devices", "2"]


def run_fit(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    return subprocess.run(
        [sys.executable, "-m", "moezoo.cli", "fit", *extra, *FIT, "--trainer.default_root_dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def test_two_process_fit_with_expert_parallelism(tmp_path):
    # With clipping by norm, which expert parallelism computes over the whole model (see the next test).
    result = run_fit(tmp_path, "--config", str(ROOT / "configs/vision/vmoe_ti_digits_expert_parallel.yaml"),
                     "--trainer.gradient_clip_val", "0.5")
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert state["model.blocks.1.mlp.experts.w_in"].shape[0] == 8  # gathered: all experts


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


@pytest.mark.parametrize("config", sorted(TASK_CONFIGS), ids=lambda c: Path(c).stem)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_process_fit_under_lightning_strategies(tmp_path, strategy, config):
    result = run_fit(tmp_path, "--config", str(ROOT / config), "--trainer.logger", "false",
                     *STRATEGIES[strategy], "--trainer.enable_checkpointing", "false", *TASK_CONFIGS[config])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "`Trainer.fit` stopped: `max_steps=3` reached" in result.stderr + result.stdout


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


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_clips_by_the_whole_models_gradient_norm(world):
    mp.spawn(_clip_worker, args=(world, free_port(), 2), nprocs=world, join=True)
