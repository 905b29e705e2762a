"""timm's generic model checks (huggingface/pytorch-image-models ``tests/test_models.py``) on every
registered vision entry, built small: forward/backward, forward_features/forward_head,
reset_classifier, default_cfg, features_only, forward_intermediates, gradient checkpointing,
TorchScript (refused with the reason, the documented route) and torch.fx (routed layers as timm's
leaf modules), torch.compile (one representative here; every entry under ``-m slow``).

The checks are ported as this suite's own code; the references they compare against are the
eager model itself and timm's own tooling (``timm.create_model``, ``timm.data``, FX feature
extraction)."""

from __future__ import annotations

import pytest
import timm
import torch

import moezoo
from moezoo.routers.base import set_routing
from moezoo.zoo.registry import get_entry

VISION = moezoo.list_models(modality="vision")


def small_args(name: str) -> dict:
    """Overrides that make entry ``name`` a few-thousand-parameter model of the same kind: 16 px,
    2 blocks of width 16, the MoE in block 1, 4 experts."""
    entry = get_entry(name)
    args = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    if entry.builder is not timm.models.vision_transformer.VisionTransformer:
        args.update(moe_blocks=[1], num_experts=4)
    if entry.default_args.get("representation_size"):
        args["representation_size"] = 12
    return args


def make(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return moezoo.create_model(name, **{**small_args(name), **kwargs})


def image(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    channels = model.patch_embed.proj.in_channels
    return torch.randn(batch, channels, 16, 16)


def routed(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "moe_indices", None))


def ensemble(name: str) -> bool:
    return get_entry(name).default_args.get("ensemble_size", 1) > 1


def test_every_vision_entry_is_covered():
    assert len(VISION) >= 14 and {"vmoe_ti_digits", "vit_ti_digits", "soft_moe_vit", "vmoe_vit"} <= set(VISION)


@pytest.mark.parametrize("name", VISION)
def test_forward_backward_and_gradients(name):
    """timm's test_model_forward (batch 1, eval) and test_model_backward (42 classes, train)."""
    model = make(name).eval()
    out = model(image(model, 1))
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    model = make(name, num_classes=42).train()
    out = model(image(model))
    assert out.shape == (2, 42)
    (out.mean() + moezoo.aux_loss(model)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", VISION)
def test_default_cfg_features_head_and_reset_classifier(name):
    """timm's test_model_default_cfgs_non_std: default_cfg is timm's dict, its classifier and first
    conv name parameters, forward_features / forward_head / reset_classifier agree."""
    model = make(name).eval()
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg and isinstance(cfg, dict) and cfg["architecture"] == name
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "num_classes", "first_conv", "classifier"):
        assert key in cfg, key
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    entry = get_entry(name)
    assert cfg["input_size"] == (entry.default_args.get("in_chans", 3), *(2 * [entry.default_args.get("img_size", 224)]))
    x = image(model)
    tokens = model.forward_features(x)
    assert tokens.shape[0] == 2 * entry.default_args.get("ensemble_size", 1) and tokens.shape[-1] == model.num_features
    features = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(model.forward_head(tokens), model.head(features))
    model.reset_classifier(0)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), features)
    model.reset_classifier(7)
    assert model.forward_head(model.forward_features(x)).shape[-1] == 7


@pytest.mark.parametrize("name", VISION)
def test_forward_intermediates_and_features_only(name):
    """timm's test_model_forward_intermediates(_features): feature maps per block, the final tokens
    equal forward_features, and create_model(features_only=True) returns the same maps."""
    model = make(name).eval()
    x = image(model)
    if ensemble(name):
        with pytest.raises(NotImplementedError, match="E\\^3"):
            model.forward_intermediates(x)
        return
    final, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape for t in intermediates] == [(2, 16, 2, 2)] * 2
    features = make(name, features_only=True, out_indices=(0, 1), feature_cls="getter").eval()
    for a, b in zip(features(x), intermediates):
        torch.testing.assert_close(a, b)
    assert features.pretrained_cfg["architecture"] == name


@pytest.mark.parametrize("name", VISION)
def test_grad_checkpointing_changes_nothing(name):
    model = make(name).eval()
    x = image(model)
    expected = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("name", VISION)
def test_torchscript_or_the_documented_refusal(name):
    """timm expects a ViT to script; routed layers refuse with the reason and the alternatives."""
    model = make(name).eval()
    if not routed(model):
        scripted = torch.jit.script(model)
        x = image(model)
        torch.testing.assert_close(scripted(x), model(x))
        return
    with pytest.raises(RuntimeError, match="cannot be compiled by TorchScript.*torch.compile.*leaf module"):
        torch.jit.script(model)


@pytest.mark.parametrize("name", VISION)
def test_fx_with_routed_layers_as_leaf_modules(name):
    """timm's test_model_forward_fx / test_model_backward_fx: timm's FX feature extraction (which
    keeps its registered notrace modules, moezoo's routed layers among them, as leaves) gives the
    eager outputs and gradients."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model = make(name).eval()
    x = image(model)
    nodes = get_graph_node_names(model)[1]
    fx = create_feature_extractor(model, return_nodes=[nodes[-1]])
    torch.testing.assert_close(next(iter(fx(x).values())), model(x))
    fx.train()
    next(iter(fx(x).values())).mean().backward()
    assert all(p.grad is not None for p in fx.parameters())


def _graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    set_routing(model, check_finite=False)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return torch._dynamo.explain(model)(x).graph_break_count


def _compiled_matches_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    torch._dynamo.reset()
    set_routing(model, check_finite=False)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("name", ["vmoe_ti_digits", "soft_moe_vit"])
def test_torch_compile_keeps_one_graph(name):
    """torch._dynamo.explain: no graph break (timm's ViT has none; V-MoE had 30, Soft MoE 12)."""
    model = make(name).eval()
    x = image(model)
    assert _graph_breaks(model, x) == 0
    _compiled_matches_eager(model, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", VISION)
def test_torch_compile_fullgraph_every_entry(name):
    model = make(name).eval()
    _compiled_matches_eager(model, image(model))


def test_timm_tools_on_the_shipped_entries():
    """timm.create_model / resolve_data_config / create_transform / save_for_hf on the shipped
    weights (failures 1, 4 and 12 of the peer suite)."""
    import timm.data

    for name in ("vmoe_ti_digits", "vit_ti_digits"):
        model = timm.create_model(name, pretrained=True).eval()
        config = timm.data.resolve_data_config(model=model)
        assert config["input_size"] == (1, 16, 16) and config["mean"] == (0.5,) and config["std"] == (0.5,)
        transform = timm.data.create_transform(**config)
        from PIL import Image

        picture = Image.new("L", (40, 30), color=255)
        pixels = transform(picture)
        assert pixels.shape == (1, 16, 16) and torch.allclose(pixels, torch.ones_like(pixels))
        assert model(pixels[None]).shape == (1, 10)
