"""Branch-Train-MiX: the merged weights are the parents' (experts = FFNs, the rest averaged), and
routed to expert i a block computes parent i's FFN."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moezoo.layers import MoE
from moezoo.routers.routing import Routing
from moezoo.zoo.btx import branch_train_mix

ARCH = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=12, depth=2, num_heads=2, mlp_ratio=2.0)


def parents(n=3, **overrides):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(VisionTransformer(**(ARCH | overrides)).eval())
    return out


class Forced(nn.Module):
    """Routes every token to one expert with weight 1."""

    def __init__(self, expert, num_experts):
        super().__init__()
        self.expert, self.num_experts = expert, num_experts

    def forward(self, x, **_):
        t = torch.arange(x.shape[0])
        return Routing(t, torch.full_like(t, self.expert), torch.ones(x.shape[0]), x.shape[0], self.num_experts)


def test_merged_weights_are_the_parents():
    models = parents()
    merged = branch_train_mix(models)
    state, states = merged.state_dict(), [m.state_dict() for m in models]
    for j, block in enumerate(merged.blocks):
        assert isinstance(block.mlp, MoE) and block.mlp.num_experts == 3 and block.mlp.router.k == 2
        for i, m in enumerate(models):
            mlp = m.blocks[j].mlp
            assert torch.equal(block.mlp.experts.w_in[i], mlp.fc1.weight.t())
            assert torch.equal(block.mlp.experts.w_out[i], mlp.fc2.weight.t())
            assert torch.equal(block.mlp.experts.b_in[i], mlp.fc1.bias)
            assert torch.equal(block.mlp.experts.b_out[i], mlp.fc2.bias)
    others = [k for k in states[0] if ".mlp." not in k]
    assert len(others) == len([k for k in state if ".mlp." not in k]) and "cls_token" in others
    for key in others:
        assert torch.equal(state[key], (states[0][key] + states[1][key] + states[2][key]) / 3), key
    # The parents are untouched.
    assert torch.equal(models[0].blocks[0].mlp.fc1.weight, parents(1)[0].blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_forced_to_expert_i_a_block_computes_parent_i_ffn(i):
    models = parents()
    merged = branch_train_mix(models).eval()
    x = torch.randn(4, 5, ARCH["embed_dim"])
    for j, block in enumerate(merged.blocks):
        block.mlp.router = Forced(i, 3)
        assert torch.allclose(block.mlp(x), models[i].blocks[j].mlp(x), atol=1e-6)


def test_merged_moe_trains_its_router():
    merged = branch_train_mix(parents(2))
    merged(torch.randn(3, 1, 8, 8)).sum().backward()
    assert merged.blocks[0].mlp.router.gate.weight.grad.abs().sum() > 0
    assert set(merged.blocks[0].mlp.last_losses) >= {"load_balancing"}


def test_different_architectures_name_the_key_and_shapes():
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight.*\(24, 12\).*\(36, 12\)"):
        branch_train_mix([parents(1)[0], parents(1, mlp_ratio=3.0)[0]])
    with pytest.raises(ValueError, match=r"blocks\.2\."):
        branch_train_mix([parents(1)[0], parents(1, depth=3)[0]])
    with pytest.raises(ValueError, match="at least 2"):
        branch_train_mix(parents(1))
    with pytest.raises(ValueError, match="k must be"):
        branch_train_mix(parents(2), k=3)


def test_recipe_merges_the_checkpoints_into_the_task_model(tmp_path):
    from types import SimpleNamespace

    from moezoo.zoo.checkpoint import save_checkpoint
    from moezoo.zoo.recipes import BranchTrainMix

    models = parents(2)
    paths = [str(save_checkpoint(m, tmp_path / f"parent{i}.safetensors")) for i, m in enumerate(models)]
    task = SimpleNamespace(model=VisionTransformer(**ARCH))
    BranchTrainMix(paths).setup(None, task, "fit")
    for i, m in enumerate(models):
        assert torch.equal(task.model.blocks[1].mlp.experts.w_in[i], m.blocks[1].mlp.fc1.weight.t())
    assert torch.equal(task.model.norm.weight, (models[0].norm.weight + models[1].norm.weight) / 2)
    with pytest.raises(ValueError, match="parents"):
        BranchTrainMix(paths[:1])
