"""google-research/vmoe checkpoints: the reader against vmoe's own restore, the conversion against
vmoe's own logits (tests/data/vmoe_checkpoints, made by tests/data/make_vmoe_checkpoints.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moezoo.modalities.vision import SoftMoEVisionTransformer, VisionTransformerMoE, from_vmoe_checkpoint
from moezoo.modalities.vision.vmoe_checkpoint import read_index, read_vmoe_checkpoint
from moezoo.modalities.vision.vmoe_convert import resize_pos_embedding, vmoe_architecture, vmoe_state_dict
from moezoo.zoo import CheckpointError

DATA = Path(__file__).resolve().parents[1] / "data" / "vmoe_checkpoints"
REFERENCE = np.load(DATA / "reference.npz")
META = json.loads(str(REFERENCE["meta"]))
RESTORED = json.loads((DATA / "restored.json").read_text())
CHECKPOINTS = ["vmoe_tiny", "vmoe_tiny_prelogits", "softmoe_tiny", "eee_tiny"]
SHARDS = [f".data-{i:05d}-of-00002" for i in range(2)]


def images(key: str) -> torch.Tensor:
    """vmoe's value_range(-1, 1) of the stored uint8 pixels, NHWC -> NCHW."""
    x = REFERENCE[key].astype(np.float32) / 255.0 * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def copy_checkpoint(name: str, folder: Path, as_name: str | None = None) -> Path:
    for suffix in [".index", *SHARDS]:
        shutil.copyfile(DATA / f"{name}{suffix}", folder / f"{as_name or name}{suffix}")
    return folder / (as_name or name)


def digest(arrays: dict[str, np.ndarray]) -> dict[str, list]:
    return {name: [list(v.shape), v.dtype.name, hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16]]
            for name, v in arrays.items()}


# -- the reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_reader_returns_what_vmoe_restores(name):
    arrays = read_vmoe_checkpoint(DATA / name)
    assert digest(arrays) == RESTORED[name]
    assert list(arrays) == sorted(RESTORED[name])


def test_reader_reads_the_format_before_versions(tmp_path):
    # The v0 index names the same data files as vmoe_tiny's (the generator copied them likewise).
    assert b"version" not in (DATA / "vmoe_tiny_v0.index").read_bytes()
    shutil.copyfile(DATA / "vmoe_tiny_v0.index", tmp_path / "vmoe_tiny_v0.index")
    for suffix in SHARDS:
        shutil.copyfile(DATA / f"vmoe_tiny{suffix}", tmp_path / f"vmoe_tiny_v0{suffix}")
    assert digest(read_vmoe_checkpoint(tmp_path / "vmoe_tiny_v0")) == RESTORED["vmoe_tiny_v0"]


def test_fixtures_split_arrays_into_chunks_over_both_shards():
    _, leaves = read_index(DATA / "vmoe_tiny")
    split = [name for name, info in leaves if len(set(info.shards)) == 2]
    assert len(split) >= 8 and "Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel" in split


class _Ext:
    def __init__(self, code: int, value) -> None:
        self.code, self.value = code, value


def _rewrite_index(path: Path, edit) -> None:
    """Decode the index keeping vmoe's IndexInfo payloads as plain lists, let ``edit`` change them,
    encode it again with the same extension types."""
    def decode(code, data):
        return _Ext(code, msgpack.unpackb(data, raw=False))

    def encode(obj):
        if isinstance(obj, _Ext):
            return msgpack.ExtType(obj.code, msgpack.packb(obj.value, use_bin_type=True))
        raise TypeError(type(obj))

    index = msgpack.unpackb(path.read_bytes(), ext_hook=decode, raw=False)
    edit(index)
    path.write_bytes(msgpack.packb(index, default=encode, use_bin_type=True))


def test_a_truncated_shard_is_a_clear_error(tmp_path):
    prefix = copy_checkpoint("vmoe_tiny", tmp_path)
    shard = tmp_path / f"vmoe_tiny{SHARDS[1]}"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name} is not a readable vmoe msgpack file"):
        read_vmoe_checkpoint(prefix)


def test_a_missing_shard_is_a_clear_error(tmp_path):
    prefix = copy_checkpoint("vmoe_tiny", tmp_path)
    (tmp_path / f"vmoe_tiny{SHARDS[0]}").unlink()
    with pytest.raises(CheckpointError, match=f"shard files not found: .*vmoe_tiny{SHARDS[0]}"):
        read_vmoe_checkpoint(prefix)


def test_an_index_naming_a_shard_that_is_not_there(tmp_path):
    prefix = copy_checkpoint("vmoe_tiny", tmp_path)

    def edit(index):
        info = index["index"]["head"]["kernel"].value
        info[2] = [5] * len(info[2])

    _rewrite_index(tmp_path / "vmoe_tiny.index", edit)
    with pytest.raises(CheckpointError, match=r"vmoe_tiny.index: head/kernel names shards \[5\] of a checkpoint with 2"):
        read_vmoe_checkpoint(prefix)


@pytest.mark.parametrize("content", [b"not msgpack at all \xc1", msgpack.packb({"step": 3}),
                                     msgpack.packb({"shard_count": 1, "index": {}, "version": "20990101"})])
def test_a_file_that_is_not_a_vmoe_checkpoint(tmp_path, content):
    (tmp_path / "other.index").write_bytes(content)
    with pytest.raises(CheckpointError, match="other.index"):
        read_vmoe_checkpoint(tmp_path / "other")


def test_a_folder_or_a_missing_index_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="Orbax"):
        read_vmoe_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="nothing.index not found"):
        read_vmoe_checkpoint(tmp_path / "nothing")


def test_an_array_its_chunks_do_not_cover(tmp_path):
    prefix = copy_checkpoint("vmoe_tiny", tmp_path)
    name = "Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"

    def edit(index):
        node = index["index"]
        for part in name.split("/"):
            node = node[part]
        node.value[1] = node.value[1][:-1]  # forget the last chunk
        node.value[2] = node.value[2][:-1]

    _rewrite_index(tmp_path / "vmoe_tiny.index", edit)
    with pytest.raises(CheckpointError, match=f"the chunks of {name} cover"):
        read_vmoe_checkpoint(prefix)


def test_a_chunk_the_index_names_but_its_shard_lacks(tmp_path):
    prefix = copy_checkpoint("vmoe_tiny", tmp_path)
    shard = tmp_path / f"vmoe_tiny{SHARDS[1]}"
    content = msgpack.unpackb(shard.read_bytes(), raw=False, ext_hook=msgpack.ExtType)
    leaf = next(k for k, v in content.items() if k[0].isdigit() and len(v) > 1)
    content[leaf] = content[leaf][1:]
    shard.write_bytes(msgpack.packb(content, use_bin_type=True))
    with pytest.raises(CheckpointError, match="not in their shards"):
        read_vmoe_checkpoint(prefix)


# -- architecture and the name/shape mapping ----------------------------------------------------


@pytest.mark.parametrize("name, cls, expected", [
    ("vmoe_tiny", VisionTransformerMoE, dict(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=4,
                                             num_heads=2, mlp_ratio=2.0, moe_blocks=[1, 3], num_experts=4,
                                             num_classes=10, class_token=True, global_pool="token",
                                             representation_size=None, activation="gelu_tanh")),
    ("vmoe_tiny_prelogits", VisionTransformerMoE, dict(moe_blocks=[2, 3], class_token=False, global_pool="avg",
                                                       fc_norm=False, representation_size=12)),
    ("softmoe_tiny", SoftMoEVisionTransformer, dict(moe_blocks=[2, 3], num_experts=4, slots_per_expert=2,
                                                    qk_norm=True, fc_norm=False)),
    ("eee_tiny", VisionTransformerMoE, dict(ensemble_size=2, representation_size=16, moe_blocks=[1, 3])),
])
def test_architecture_is_inferred_from_names_and_shapes(name, cls, expected):
    builder, kwargs = vmoe_architecture(read_vmoe_checkpoint(DATA / name))
    assert builder is cls
    assert {k: kwargs[k] for k in expected} == expected


def _linear(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def test_mapping_parameter_by_parameter():
    """Each moezoo tensor computes what flax computes with the vmoe array it came from."""
    arrays = read_vmoe_checkpoint(DATA / "softmoe_tiny")
    state = vmoe_state_dict(arrays)
    builder, kwargs = vmoe_architecture(arrays)
    model_state = builder(**kwargs).state_dict()
    assert set(state) == set(model_state)
    assert all(state[k].shape == model_state[k].shape for k in state)

    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)  # NHWC, as flax takes it
    flax_conv = np.einsum("bhpwqc,pqcd->bhwd", img.reshape(2, 4, 4, 4, 4, 3), arrays["embedding/kernel"])
    torch_conv = F.conv2d(torch.from_numpy(img.transpose(0, 3, 1, 2)), state["patch_embed.proj.weight"], stride=4)
    np.testing.assert_allclose(torch_conv.permute(0, 2, 3, 1).numpy(), flax_conv, atol=1e-5)

    x = rng.standard_normal((5, 16)).astype(np.float32)
    att = "Encoder/encoderblock_2/SelfAttention/"
    qkv = _linear(torch.from_numpy(x), state, "blocks.2.attn.qkv").numpy().reshape(5, 3, 2, 8)  # timm's split
    for j, p in enumerate(("query", "key", "value")):
        flax = np.einsum("nd,dhk->nhk", x, arrays[att + f"{p}/kernel"]) + arrays[att + f"{p}/bias"]
        np.testing.assert_allclose(qkv[:, j], flax, atol=1e-5)
    heads = rng.standard_normal((5, 2, 8)).astype(np.float32)
    flax_out = np.einsum("nhk,hkd->nd", heads, arrays[att + "out/kernel"]) + arrays[att + "out/bias"]
    np.testing.assert_allclose(_linear(torch.from_numpy(heads.reshape(5, 16)), state, "blocks.2.attn.proj").numpy(),
                               flax_out, atol=1e-5)
    np.testing.assert_array_equal(state["blocks.2.attn.q_norm.weight"].numpy(), arrays[att + "query_ln/scale"])
    assert not state["blocks.2.attn.k_norm.bias"].any()  # flax's qk LayerNorm has no bias

    dense = "Encoder/encoderblock_0/Mlp/"
    flax_fc1 = x @ arrays[dense + "Dense_0/kernel"] + arrays[dense + "Dense_0/bias"]
    np.testing.assert_allclose(_linear(torch.from_numpy(x), state, "blocks.0.mlp.fc1").numpy(), flax_fc1, atol=1e-5)
    moe = "Encoder/encoderblock_3/Moe/"
    np.testing.assert_array_equal(state["blocks.3.mlp.experts.w_in"].numpy(), arrays[moe + "Mlp/Dense_0/kernel"])
    np.testing.assert_array_equal(state["blocks.3.mlp.experts.b_out"].numpy(), arrays[moe + "Mlp/Dense_1/bias"])
    np.testing.assert_array_equal(state["blocks.3.mlp.mu"].numpy(), arrays[moe + "Router/mu"])
    np.testing.assert_array_equal(state["norm.weight"].numpy(), arrays["Encoder/encoder_norm/scale"])
    np.testing.assert_array_equal(state["pos_embed"].numpy(), arrays["Encoder/posembed_input/pos_embedding"])

    vmoe = read_vmoe_checkpoint(DATA / "eee_tiny")
    vstate = vmoe_state_dict(vmoe)
    kernel = vmoe["Encoder/encoderblock_1/Moe/Router/dense/kernel"]  # (D, members, experts per member)
    logits = x @ kernel.reshape(16, 4)  # member m's expert e is expert m * 2 + e
    np.testing.assert_allclose(F.linear(torch.from_numpy(x), vstate["blocks.1.mlp.router.gate.weight"]).numpy(),
                               logits, atol=1e-5)
    np.testing.assert_array_equal(vstate["cls_token"].numpy(), vmoe["cls"])
    feats = rng.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(_linear(torch.from_numpy(feats), vstate, "pre_logits.fc").numpy(),
                               feats @ vmoe["pre_logits/kernel"] + vmoe["pre_logits/bias"], atol=1e-5)
    np.testing.assert_allclose(_linear(torch.from_numpy(feats), vstate, "head").numpy(),
                               feats @ vmoe["head/kernel"] + vmoe["head/bias"], atol=1e-5)


def _broken(arrays: dict, drop: str | None = None, **replace) -> dict:
    out = {k: v for k, v in arrays.items() if k != drop}
    out.update({k.replace("__", "/"): v for k, v in replace.items()})
    return out


@pytest.mark.parametrize("change, message", [
    (dict(drop="head/kernel"), "'head/kernel' is missing"),
    (dict(drop="Encoder/posembed_input/pos_embedding"), "'Encoder/posembed_input/pos_embedding' is missing"),
    (dict(Encoder__posembed_input__pos_embedding=np.zeros((1, 20, 16), np.float32)), "pos_embedding .* not a square"),
    (dict(Encoder__encoderblock_0__SelfAttention__query__kernel=np.zeros((16, 4, 8), np.float32)),
     "query/kernel .*heads x head_dim"),
    (dict(embedding__kernel=np.zeros((4, 2, 3, 16), np.float32)), "embedding/kernel .*non-square patch"),
    (dict(MapHead__probe=np.zeros((1, 1, 16), np.float32)), "'MapHead/probe'"),
    (dict(Encoder__encoderblock_1__Moe__Mlp__Dense_0__kernel=np.zeros((4, 16, 64), np.float32)), "MLP width"),
])
def test_an_architecture_it_cannot_infer_names_the_parameter(change, message):
    arrays = _broken(read_vmoe_checkpoint(DATA / "vmoe_tiny"), **change)
    with pytest.raises(ValueError, match=message):
        vmoe_architecture(arrays)


def test_an_unknown_parameter_is_named():
    arrays = dict(read_vmoe_checkpoint(DATA / "vmoe_tiny"), **{"Encoder/extra/kernel": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="Encoder/extra/kernel"):
        vmoe_state_dict(arrays)


def test_resized_position_embedding_is_vmoe_vit_zoom():
    out = resize_pos_embedding(REFERENCE["vit_zoom/source"], 6, class_token=True)
    np.testing.assert_allclose(out, REFERENCE["vit_zoom/target_6x6"], atol=1e-6, rtol=0)
    model = from_vmoe_checkpoint(DATA / "vmoe_tiny", k=2, group_images=4, capacity_factor=2.0, img_size=24)
    assert model(torch.zeros(2, 3, 24, 24)).shape == (2, 10)
    np.testing.assert_allclose(model.pos_embed.detach().numpy(), REFERENCE["vit_zoom/target_6x6"], atol=1e-6)


# -- whole models against vmoe's logits ---------------------------------------------------------

def _cases(bf16: bool) -> list[str]:
    return sorted(c for c, m in META["cases"].items() if bool(m.get("bfloat16")) == bf16)


def _model_for(case: str, **extra):
    settings = META["cases"][case]
    routing = {}
    if "k" in settings:
        routing = dict(k=settings["k"], group_size=settings["group_size"], capacity_factor=settings["capacity_factor"],
                       batch_priority=settings["batch_priority"])
    return from_vmoe_checkpoint(DATA / settings["checkpoint"], **routing, **extra), settings


def _check_case(case: str, tolerance: float, **extra) -> None:
    model, settings = _model_for(case, **extra)
    assert not model.training
    x = images(settings["images"])
    with torch.no_grad():
        if settings.get("ensemble_size"):
            np.testing.assert_allclose(model.forward_members(x).numpy(), REFERENCE[f"{case}/logits"], atol=tolerance,
                                       rtol=0)
            log_probs = model(x)
            np.testing.assert_allclose(log_probs.numpy(), REFERENCE[f"{case}/ensemble_log_probs"], atol=tolerance,
                                       rtol=0)
            np.testing.assert_array_equal(log_probs.argmax(-1).numpy(), REFERENCE[f"{case}/label_pred"])
        else:
            np.testing.assert_allclose(model(x).numpy(), REFERENCE[f"{case}/logits"], atol=tolerance, rtol=0)
    dropped = [layer.last_stats.get("dropped_fraction") for layer in model.moe_layers()]
    if "nodrop" in case:
        assert max(float(d) for d in dropped) == 0.0
    elif "drop" in case:
        assert max(float(d) for d in dropped) > 0.1  # the case really exercises capacity


@pytest.mark.parametrize("case", _cases(bf16=False))
def test_converted_model_matches_vmoe_in_float32(case):
    _check_case(case, 1e-4)


@pytest.mark.parametrize("case", _cases(bf16=True))
def test_converted_model_matches_vmoe_with_bf16_dispatch(case):
    _check_case(case, 1e-3, bfloat16_dispatch=True)


def test_e3_router_kernel_stored_flat_loads_with_ensemble_size(tmp_path):
    """vmoe's E^3 fine-tuning config reshapes a (D, E) router kernel to (D, M, E/M): both load alike."""
    arrays = read_vmoe_checkpoint(DATA / "eee_tiny")
    flat = {k: v.reshape(v.shape[0], -1) if k.endswith("Router/dense/kernel") else v for k, v in arrays.items()}
    a, b = vmoe_state_dict(arrays), vmoe_state_dict(flat, ensemble_size=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert vmoe_architecture(flat)[1].get("ensemble_size") is None  # without it: a plain V-MoE
    with pytest.raises(ValueError, match="for 2 members"):
        vmoe_architecture(arrays, ensemble_size=4)


@pytest.mark.parametrize("missing, message", [("k", "needs k"), ("group_images", "needs group_images"),
                                              ("capacity_factor", "needs capacity_factor")])
def test_a_vmoe_checkpoint_without_routing_settings_names_the_missing_one(missing, message):
    routing = dict(k=2, group_images=4, capacity_factor=1.0)
    del routing[missing]
    with pytest.raises(ValueError, match=message):
        from_vmoe_checkpoint(DATA / "vmoe_tiny", **routing)


def test_soft_moe_takes_no_routing_settings():
    with pytest.raises(ValueError, match=r"\['k'\] do not apply"):
        from_vmoe_checkpoint(DATA / "softmoe_tiny", k=2)


def test_a_failed_load_builds_nothing(tmp_path):
    prefix = copy_checkpoint("vmoe_tiny", tmp_path)
    (tmp_path / f"vmoe_tiny{SHARDS[1]}").write_bytes(b"")
    with pytest.raises(CheckpointError, match=SHARDS[1]):
        from_vmoe_checkpoint(prefix, k=2, group_images=4, capacity_factor=1.0)


# -- zoo entries: download, one conversion, export, evaluation ------------------------------------

from moezoo.modalities.vision.vmoe_checkpoint import checkpoint_url  # noqa: E402
from moezoo.modalities.vision.zoo import VMOE_RELEASES  # noqa: E402
from moezoo.zoo import PretrainedCfg, create_model, get_entry, register_model  # noqa: E402
from moezoo.zoo.registry import _REGISTRY  # noqa: E402

CONVERTER = "moezoo.modalities.vision.vmoe_convert:zoo_weights"
PUBLISHED = {"vmoe_s32_last2_ilsvrc2012_randaug_light1", "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
             "vmoe_s32_last2_ilsvrc2012_randaug_medium", "vmoe_b16_imagenet21k_randaug_strong",
             "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012", "eee_s32_last2_ilsvrc2012",
             "eee_s32_last2_ilsvrc2012_ft_cifar100"}


def test_every_released_checkpoint_is_an_entry_with_its_config_settings():
    assert set(VMOE_RELEASES) == PUBLISHED
    for name in PUBLISHED:
        entry = get_entry(name)
        cfg, args = entry.pretrained_cfg, entry.default_args
        assert cfg.source == f"url:{checkpoint_url(f'gs://vmoe_checkpoints/{name}')}"
        assert cfg.source == f"url:https://storage.googleapis.com/vmoe_checkpoints/{name}"
        assert cfg.converter == CONVERTER
        assert (args["activation"], args["batch_priority"], args["capacity_multiple_of"]) == ("gelu_tanh", False, 4)
        assert args["bfloat16_dispatch"] is True
        assert args["k"] == (1 if name.startswith("eee") else 2)
        assert args["group_images"] == (128 if name.endswith("cifar100") else 8)
        assert cfg.input_spec["image_size"] == args["img_size"] and cfg.input_spec["mean"] == 0.5
        assert "Not measured here" in entry.card["published"]
    assert get_entry("vmoe_s32_last2_ilsvrc2012_randaug_light1").default_args["eval_capacity_factor"] == 4.0
    assert get_entry("vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012").default_args["capacity_factor"] == 1.5


@pytest.fixture
def offline_zoo(tmp_path, monkeypatch):
    """A vmoe entry whose prefix is a file:// URL of a fixture copy, and a private download cache;
    ``downloads`` lists what the real download code fetched."""
    import torch.hub

    remote = tmp_path / "bucket"
    remote.mkdir()
    copy_checkpoint("vmoe_tiny", remote)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "cache"))
    downloads = []
    real = torch.hub.download_url_to_file

    def counting(url, dst, hash_prefix=None, progress=True):
        downloads.append(url)
        real(url, dst, hash_prefix, progress=False)

    monkeypatch.setattr(torch.hub, "download_url_to_file", counting)
    spec = {"image_size": 16, "channels": 3, "mean": 0.5, "std": 0.5, "crop_pct": 1.0, "crop_mode": "squash",
            "interpolation": "bilinear"}
    register_model("test_vmoe_tiny", VisionTransformerMoE, modality="vision",
                   pretrained_cfg=PretrainedCfg(source=f"url:{(remote / 'vmoe_tiny').as_uri()}", converter=CONVERTER,
                                                input_spec=spec),
                   evaluate="moezoo.modalities.vision.evaluate:evaluate_image_folder",
                   **vmoe_architecture(read_vmoe_checkpoint(DATA / "vmoe_tiny"))[1],
                   k=2, group_images=4, capacity_factor=0.5, eval_capacity_factor=0.5)
    try:
        yield downloads, tmp_path
    finally:
        _REGISTRY.pop("test_vmoe_tiny")


def test_pretrained_fetches_the_shards_and_converts_once(offline_zoo):
    downloads, tmp_path = offline_zoo
    model = create_model("test_vmoe_tiny", pretrained=True).eval()
    assert [Path(u).name for u in downloads] == ["vmoe_tiny.index", *[f"vmoe_tiny{s}" for s in SHARDS]]
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert cached == ["model.safetensors"]  # the shards are gone once converted
    again = create_model("test_vmoe_tiny", pretrained=True).eval()
    assert len(downloads) == 3  # nothing fetched the second time
    x = images("images8")
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), REFERENCE["vmoe_tiny/bpr_drop/logits"], atol=1e-4, rtol=0)
        assert torch.equal(model(x), again(x))


def test_a_failed_download_leaves_nothing_converted(offline_zoo):
    downloads, tmp_path = offline_zoo
    (tmp_path / "bucket" / f"vmoe_tiny{SHARDS[1]}").unlink()
    with pytest.raises(Exception, match="vmoe_tiny.data-00001-of-00002"):
        create_model("test_vmoe_tiny", pretrained=True)
    assert not list((tmp_path / "cache").rglob("model.safetensors"))


def test_convert_cli_writes_a_folder_create_model_loads(tmp_path):
    from moezoo.cli import main

    out = tmp_path / "converted"
    assert main(["zoo", "convert", "vmoe", str(DATA / "vmoe_tiny"), str(out), "--k", "2", "--group-size", "68",
                 "--capacity-factor", "0.5", "--no-batch-priority"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = create_model(checkpoint_path=out).eval()
    assert model.moezoo_entry == "vmoe_vit"
    with torch.no_grad():
        np.testing.assert_allclose(model(images("images8")).numpy(), REFERENCE["vmoe_tiny/vanilla_drop/logits"],
                                   atol=1e-4, rtol=0)
    soft = tmp_path / "soft"
    assert main(["zoo", "convert", "vmoe", str(DATA / "softmoe_tiny"), str(soft)]) == 0
    with torch.no_grad():
        np.testing.assert_allclose(create_model(checkpoint_path=soft).eval()(images("images8")).numpy(),
                                   REFERENCE["softmoe_tiny/fp32/logits"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="needs k"):
        main(["zoo", "convert", "vmoe", str(DATA / "vmoe_tiny"), str(tmp_path / "no_k")])
    assert not (tmp_path / "no_k").exists()


def test_convert_cli_exports_a_zoo_entry_with_its_card(offline_zoo):
    from moezoo.cli import main

    _, tmp_path = offline_zoo
    out = tmp_path / "entry"
    assert main(["zoo", "convert", "vmoe", "test_vmoe_tiny", str(out), "--capacity-factor", "2.0"]) == 0
    model = create_model(checkpoint_path=out).eval()
    assert model.moezoo_entry == "test_vmoe_tiny" and model.moe_layers()[0].router.eval_capacity_factor == 2.0
    with torch.no_grad():
        np.testing.assert_allclose(model(images("images8")).numpy(), REFERENCE["vmoe_tiny/nodrop/logits"],
                                   atol=1e-4, rtol=0)


def test_zoo_eval_on_an_image_folder_uses_the_entry_preprocessing(offline_zoo, capsys):
    from PIL import Image

    from moezoo.cli import main

    _, tmp_path = offline_zoo
    rng = np.random.default_rng(3)
    files = []
    for label, name in enumerate(("a_class", "b_class")):
        folder = tmp_path / "imagenet" / "val" / name
        folder.mkdir(parents=True)
        for i in range(6):
            path = folder / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
            files.append((path, label))
    assert main(["zoo", "eval", "test_vmoe_tiny", "--data-dir", str(tmp_path / "imagenet"), "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)

    # The same preprocessing by hand: squash-resize to 16 x 16 (bilinear), scale to [-1, 1].
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.BILINEAR)) for p, _ in files])
    x = torch.from_numpy((pixels.astype(np.float32) / 255.0 * 2.0 - 1.0).transpose(0, 3, 1, 2).copy())
    labels = torch.tensor([label for _, label in files])
    model = from_vmoe_checkpoint(DATA / "vmoe_tiny", k=2, group_images=4, capacity_factor=0.5)
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 4]) for i in range(0, len(x), 4)])
    assert result["examples"] == 12
    assert result["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)


def test_float32_dispatch_is_measurably_not_vmoes_bf16_dispatch():
    """The bf16 cases can tell the two apart: what float32 experts give is off by more than 1e-3."""
    model, settings = _model_for("vmoe_tiny/bpr_drop_bf16")
    with torch.no_grad():
        diff = np.abs(model(images(settings["images"])).numpy() - REFERENCE["vmoe_tiny/bpr_drop_bf16/logits"]).max()
    assert diff > 1e-3
