"""V-MoE and Soft MoE ViTs: placement, shapes, losses, BPR inside the model, upcycling."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from moezoo.layers import aux_loss
from moezoo.layers.placement import moe_block_indices
from moezoo.modalities.vision import ImageDataModule, SoftMoEVisionTransformer, VisionTransformerMoE
from moezoo.routers import functional as RF
from moezoo.routers import set_routing
from moezoo.zoo import upcycle_vit

TINY = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=2)


@pytest.mark.parametrize(
    "depth, placement, expected",
    [
        (8, "every_2", [1, 3, 5, 7]),
        (12, "every_3", [2, 5, 8, 11]),
        (8, "last_2", [5, 7]),  # the reference counts "Last n" over odd blocks
        (32, "last_5", [23, 25, 27, 29, 31]),
        (12, "final_6", [6, 7, 8, 9, 10, 11]),
        (4, [0, 2], [0, 2]),
        (4, "none", []),
    ],
)
def test_moe_block_placement_as_reference(depth, placement, expected):
    assert moe_block_indices(depth, placement) == expected


@pytest.mark.parametrize("bad", ["every", "last_9", "sometimes_2", [8]])
def test_bad_placement_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="moe_blocks"):
        moe_block_indices(8, bad)


def test_vmoe_shapes_losses_and_paper_defaults():
    torch.manual_seed(0)
    model = VisionTransformerMoE(**TINY, moe_blocks="every_2", num_experts=4, k=2)
    assert model.moe_indices == [1, 3]
    layer = model.moe_layers()[0]
    router = layer.router
    assert (router.k, router.noise_std / router.num_experts, router.capacity_factor) == (2, 0.25, 1.05)
    assert router.group_size == 8 * 17 and router.capacity_multiple_of == 4 and router.batch_priority
    assert torch.equal(layer.experts.w_in[0], layer.experts.w_in[3])  # identical expert init
    model.train()
    logits = model(torch.randn(16, 1, 16, 16))
    assert logits.shape == (16, 10)
    losses = [m.last_losses for m in model.moe_layers()]
    assert all(set(layer) == {"importance", "load"} for layer in losses)
    expected = sum(0.005 * (layer["importance"] + layer["load"]) for layer in losses)
    assert torch.allclose(aux_loss(model), expected)
    model.eval()
    model(torch.randn(16, 1, 16, 16))
    assert all(set(m.last_losses) == {"importance"} for m in model.moe_layers())


def test_router_sees_the_second_layernorm_output():
    model = VisionTransformerMoE(**TINY, num_experts=4).eval()
    seen = {}
    block = model.blocks[1]
    block.mlp.router.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    block.norm2.register_forward_hook(lambda m, args, out: seen.update(norm2=out))
    model(torch.randn(2, 1, 16, 16))
    assert torch.equal(seen["x"], seen["norm2"].reshape(-1, 32))


def test_bpr_in_the_vit_drops_lowest_priority_first():
    torch.manual_seed(1)
    model = VisionTransformerMoE(**TINY, num_experts=4, k=2, eval_capacity_factor=0.3).eval()
    captured = {}
    layer = model.moe_layers()[0]
    layer.router.register_forward_hook(lambda m, args, out: captured.update(x=args[0], routing=out))
    model(torch.randn(16, 1, 16, 16))
    routing = captured["routing"]
    probs = torch.softmax(routing.logits, -1)
    priority, top1 = probs.max(-1)
    kept_first = torch.zeros(probs.shape[0], dtype=torch.bool)
    mask = routing.expert == top1[routing.token]
    kept_first[routing.token[mask]] = True
    group = layer.router.group_size
    assert routing.stats["dropped_fraction"] > 0.3
    for g in range(probs.shape[0] // group):
        sl = slice(g * group, (g + 1) * group)
        for e in range(4):
            chose = top1[sl] == e
            kept = kept_first[sl] & chose
            dropped = ~kept_first[sl] & chose
            if kept.any() and dropped.any():
                assert priority[sl][kept].min() >= priority[sl][dropped].max()


def test_set_routing_changes_eval_capacity_and_bpr():
    model = VisionTransformerMoE(**TINY, num_experts=4)
    set_routing(model, eval_capacity_factor=0.5, batch_priority=False)
    assert all(m.router.eval_capacity_factor == 0.5 and not m.router.batch_priority for m in model.moe_layers())


def _naive_soft_moe(layer, x):
    dispatch, combine = RF.soft_moe_weights(x, layer.mu, layer.scale)
    ex = layer.experts
    out = torch.zeros_like(x)
    for g in range(x.shape[0]):
        for e in range(layer.num_experts):
            for p in range(layer.slots_per_expert):
                slot = (dispatch[g, :, e, p, None] * x[g]).sum(0)
                y = F.gelu(slot @ ex.w_in[e] + ex.b_in[e]) @ ex.w_out[e] + ex.b_out[e]
                out[g] += combine[g, :, e, p, None] * y
    return out


def test_soft_moe_layer_against_naive_loop_and_shapes():
    torch.manual_seed(2)
    model = SoftMoEVisionTransformer(**TINY, num_experts=8, slots_per_expert=2)
    assert model.moe_indices == [2, 3] and model.global_pool == "avg" and model.cls_token is None
    layer = model.moe_layers()[0]
    x = torch.randn(3, 16, 32)
    assert torch.allclose(layer(x), _naive_soft_moe(layer, x), atol=1e-5)
    assert layer.last_stats["tokens_per_expert"].sum().item() == pytest.approx(3 * 16, rel=1e-5)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert aux_loss(model).item() == 0.0


def test_upcycled_vit_equals_dense_when_nothing_is_dropped():
    torch.manual_seed(3)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    up = upcycle_vit(dense, moe_blocks="every_2", num_experts=4, k=2, capacity_factor=4.0)
    assert up.moe_indices == list(range(1, 12, 2))
    x = torch.randn(8, 3, 32, 32)
    for mode in (False, True):  # noise in training changes the choice, not the (identical) experts
        dense.train(mode)
        up.train(mode)
        out = up(x)
        assert max(m.mlp.last_stats["dropped_fraction"].item() for m in up.blocks[1::2]) == 0.0
        assert torch.allclose(out, dense(x), atol=1e-5)
    assert dense.blocks[1].mlp.__class__.__name__ == "Mlp"  # the dense model is untouched


def test_upcycling_rejects_non_vit():
    with pytest.raises(ValueError, match="VisionTransformer"):
        upcycle_vit(torch.nn.Linear(2, 2))


def test_digits_datamodule_splits():
    dm = ImageDataModule("digits", image_size=16, batch_size=32)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 16, 16) and labels.max() < 10
    assert images.min() >= -1.0 and images.max() <= 1.0
    with pytest.raises(ValueError, match="needs root"):
        ImageDataModule("folder")


def test_image_folders_load_with_timm_transforms(tmp_path):
    from PIL import Image

    for split, count in (("train", 4), ("val", 2)):
        for label, colour in (("black", 0), ("white", 255)):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 12), (colour,) * 3).save(folder / f"{i}.png")
    dm = ImageDataModule("folder", root=str(tmp_path), image_size=16, batch_size=4, augment=True)
    assert dm.num_classes == 2 and dm.splits["train"].classes == ["black", "white"]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and set(labels.tolist()) <= {0, 1}
    images, labels = next(iter(dm.val_dataloader()))  # evaluation: resize and centre crop, no augmentation
    # Pixels scaled to [-1, 1] with mean = std = 0.5: black -> -1, white -> 1 (V-MoE's convention).
    expected = torch.where(labels == 0, -1.0, 1.0).view(-1, 1, 1, 1).expand_as(images)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    assert len(dm.splits["test"]) == 4  # no test folder: the validation images
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ImageDataModule("torchvision:MNIST", root=str(tmp_path / "nothing")).setup()


def test_mixup_trains_on_soft_targets():
    from moezoo.modalities.vision import ImageClassification

    torch.manual_seed(0)
    model = VisionTransformerMoE(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=2,
                                 num_heads=2, num_experts=2)
    task = ImageClassification(model, mixup_alpha=0.2)
    images, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    # timm's Mixup draws its mixing weight from numpy and mixes the batch in place.
    torch.manual_seed(1), np.random.seed(0)
    loss, _ = task.step((images.clone(), labels), "train")
    # The same draw by hand: the batch mixed with its flip, the one-hot targets likewise.
    torch.manual_seed(1), np.random.seed(0)
    mixed, soft = task.mixup(images.clone(), labels)
    expected = torch.sum(-soft * F.log_softmax(model(mixed), dim=-1), dim=-1).mean()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(soft.max(dim=-1).values, torch.ones(4))  # targets really are soft


# -- the reference's conventions as constructor options -----------------------------------------

def test_activation_reaches_the_dense_mlps_and_the_experts():
    torch.manual_seed(4)
    model = VisionTransformerMoE(**TINY, num_experts=4, activation="gelu_tanh")
    x = torch.randn(3, 32)
    mlp = model.blocks[0].mlp
    expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    torch.testing.assert_close(mlp(x), expected)
    assert model.moe_layers()[0].experts.activation == "gelu_tanh"
    default = VisionTransformerMoE(**TINY, num_experts=4).blocks[0].mlp
    torch.testing.assert_close(default(x), default.fc2(F.gelu(default.fc1(x))))  # exact GELU stays the default
    with pytest.raises(ValueError, match="activation must be one of"):
        SoftMoEVisionTransformer(**TINY, num_experts=4, activation="swish")


def test_representation_layer_is_linear_tanh_before_the_head():
    torch.manual_seed(5)
    model = VisionTransformerMoE(**TINY, num_experts=4, representation_size=12).eval()
    tokens = model.forward_features(torch.randn(2, 1, 16, 16))
    features = torch.tanh(model.pre_logits.fc(tokens[:, 0]))
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), features)
    torch.testing.assert_close(model.forward_head(tokens), model.head(features))
    model.reset_classifier(5)
    assert (model.head.in_features, model.head.out_features) == (12, 5)
    assert isinstance(VisionTransformerMoE(**TINY, num_experts=4).pre_logits, torch.nn.Identity)
    with pytest.raises(ValueError, match="representation_size"):
        VisionTransformerMoE(**TINY, num_experts=4, representation_size=0)


def test_routing_groups_in_tokens_or_images():
    def group(**kwargs):
        return VisionTransformerMoE(**TINY, num_experts=4, **kwargs).moe_layers()[0].router.group_size

    assert (group(), group(group_images=2), group(group_size=24)) == (8 * 17, 2 * 17, 24)
    with pytest.raises(ValueError, match="group_images or group_size, not both"):
        group(group_images=2, group_size=24)


def test_soft_moe_head_normalises_every_token_then_pools():
    torch.manual_seed(6)
    x = torch.randn(2, 1, 16, 16)
    for fc_norm in (False, True):
        model = SoftMoEVisionTransformer(**TINY, num_experts=4, fc_norm=fc_norm).eval()
        tokens = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        norm = model.fc_norm if fc_norm else model.norm
        pooled = norm(tokens).mean(1) if not fc_norm else norm(tokens.mean(1))
        torch.testing.assert_close(model(x), model.head(pooled))


def test_e3_partitions_experts_per_member_and_averages_their_probabilities():
    torch.manual_seed(7)
    model = VisionTransformerMoE(**TINY, num_experts=4, k=1, ensemble_size=2, moe_blocks=[1, 3]).eval()
    layer = model.moe_layers()[0]
    assert layer.router.ensemble_size == 2 and layer.router.group_size == 8 * 17 * 2
    seen = {}
    layer.router.register_forward_hook(lambda m, args, out: seen.update(x=args[0], routing=out))
    x = torch.randn(3, 1, 16, 16)
    members = model.forward_members(x)
    assert members.shape == (6, 10)
    routing = seen["routing"]
    assert torch.equal(routing.token % 2, routing.expert // 2)  # token i belongs to member i % 2
    # Before the first MoE block the two members' copies of a token are identical.
    assert torch.equal(seen["x"][0::2], seen["x"][1::2])
    expected = torch.log(torch.softmax(members, -1).view(3, 2, 10).mean(1))
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="needs at least one MoE block"):
        VisionTransformerMoE(**TINY, num_experts=4, ensemble_size=2, moe_blocks="none")
    with pytest.raises(ValueError, match="multiple of ensemble_size"):
        VisionTransformerMoE(**TINY, num_experts=3, k=1, ensemble_size=2)
