"""Generate tests/data/vmoe_checkpoints/ by running google-research/vmoe's own code.

Not run by CI or pytest: it needs JAX and the reference sources, which moezoo never imports.

Reference sources (fetched as plain trees, put on PYTHONPATH, never copied into moezoo):
  - https://github.com/google-research/vmoe at 942a78bc81d2e63199f0933733582ddae0715416
  - https://github.com/google-research/vision_transformer at c6de1e5378c9831a8477feb30994971bdc409e46
    (vmoe imports ``vit_jax.models_vit``)

Environment (Python 3.11, CPU only), outside the repository:
  python -m venv /work/venvs/vmoe
  /work/venvs/vmoe/bin/pip install "jax[cpu]==0.10.2" "flax==0.12.8" numpy scipy absl-py cachetools \
      chex clu ml-collections optax tensorflow-cpu einops
  (resolved here to jaxlib 0.10.2, numpy 2.4.6, tensorflow-cpu 2.21.0, ml-collections 1.1.0,
  optax 0.2.8, msgpack 1.2.4; tensorflow is only used by vmoe for ``tf.io.gfile``)

Run from the repository root:
  PYTHONPATH=/path/to/vmoe:/path/to/vision_transformer /work/venvs/vmoe/bin/python \
      tests/data/make_vmoe_checkpoints.py

What it writes (see tests/data/vmoe_checkpoints.md for the key scheme):
  - ``<model>.index`` + ``<model>.data-0000{0,1}-of-00002``: four tiny models built with vmoe's own
    classes (V-MoE, V-MoE with GAP + pre-logits, Soft MoE, E^3), every parameter perturbed away
    from its initial value, saved with vmoe's ``partitioned.save_checkpoint`` over two shards with
    small ``max_chunk_bytes`` so that most arrays are split into chunks spread over both shards.
  - ``vmoe_tiny_v0.index``: the index of ``vmoe_tiny`` in the format before 2022-06-22 (no
    ``version`` key), written by vmoe's ``base.save_checkpoint``; its data files would be byte
    copies of ``vmoe_tiny``'s, so they are not kept.
  - ``restored.json``: what vmoe's ``partitioned.restore_checkpoint`` returns for each
    checkpoint: flax name -> [shape, dtype, first 16 hex digits of the sha256 of its C-order bytes].
  - ``reference.npz``: input images (uint8; the float input is ``u8 / 255 * 2 - 1``, vmoe's
    ``value_range(-1, 1)``, NHWC) and vmoe's logits for every case, plus vmoe's ``vit_zoom`` of one
    position embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import vmoe.checkpoints.base as ckpt_base
import vmoe.checkpoints.partitioned as ckpt_partitioned
import vmoe.evaluate.ensemble as vmoe_ensemble
import vmoe.initialization.rules as vmoe_rules
import vmoe.projects.soft_moe.router as soft_router
from vmoe.nn.vit_moe import VisionTransformerMoe
from vmoe.nn.vit_moe_ensemble import VisionTransformerMoeEnsemble

OUT = Path(__file__).resolve().parent / "vmoe_checkpoints"
VMOE_COMMIT = "942a78bc81d2e63199f0933733582ddae0715416"
VIT_COMMIT = "c6de1e5378c9831a8477feb30994971bdc409e46"
MAX_CHUNK_BYTES = 1024
NUM_SHARDS = 2
#: A routing decision closer than this (in probability) could flip between float32 libraries.
MARGIN = 2e-5

WIDTH, HEADS, MLP, DEPTH, PATCH, IMAGE, CLASSES = 16, 2, 32, 4, 4, 16, 10


def encoder(moe: dict, qk_norm: bool = False) -> dict:
    return dict(num_layers=DEPTH, mlp_dim=MLP, num_heads=HEADS, dropout_rate=0.0,
                attention_dropout_rate=0.0, attention_qk_norm=qk_norm, moe=moe)


def vmoe_router(k: int, capacity_factor: float, batch_priority: bool, bfloat16: bool) -> dict:
    return dict(num_selected_experts=k, noise_std=1.0, importance_loss_weight=0.005, load_loss_weight=0.005,
                dispatcher=dict(name="einsum", bfloat16=bfloat16, capacity_factor=capacity_factor,
                                batch_priority=batch_priority, capacity_ceil_or_round="ceil",
                                capacity_multiple_of=4))


def vmoe_tiny(k=2, capacity_factor=2.0, batch_priority=True, bfloat16=False, group_size=4 * 17):
    """Token classifier, no pre-logits, MoE in blocks 1 and 3 (E=4), groups of 4 images."""
    moe = dict(layers=(1, 3), num_experts=4, group_size=group_size, dropout_rate=0.0, split_rngs=True,
               router=vmoe_router(k, capacity_factor, batch_priority, bfloat16))
    return VisionTransformerMoe(num_classes=CLASSES, patch_size=(PATCH, PATCH), hidden_size=WIDTH,
                                classifier="token", representation_size=None, deterministic=True,
                                encoder=encoder(moe))


def vmoe_tiny_prelogits(k=1, capacity_factor=1.0, batch_priority=True, bfloat16=False, group_size=24):
    """GAP classifier with pre-logits (12), MoE in blocks 2 and 3, groups of 24 tokens (1.5 images)."""
    moe = dict(layers=(2, 3), num_experts=4, group_size=group_size, dropout_rate=0.0, split_rngs=True,
               router=vmoe_router(k, capacity_factor, batch_priority, bfloat16))
    return VisionTransformerMoe(num_classes=CLASSES, patch_size=(PATCH, PATCH), hidden_size=WIDTH,
                                classifier="gap", representation_size=12, deterministic=True,
                                encoder=encoder(moe))


def softmoe_tiny():
    """vmoe's Soft MoE ViT (projects/soft_moe configs): GAP, qk-norm, SoftRouter in the last 2 blocks."""
    moe = dict(layers=(2, 3), num_experts=4, group_size=(IMAGE // PATCH) ** 2, split_rngs=True,
               router=dict(name="vmoe.projects.soft_moe.router.SoftRouter", num_slots=2, capacity_factor=None,
                           compute_similarity_metrics=False))
    return VisionTransformerMoe(num_classes=CLASSES, patch_size=(PATCH, PATCH), hidden_size=WIDTH,
                                classifier="gap", deterministic=True, encoder=encoder(moe, qk_norm=True))


def eee_tiny(k=1, capacity_factor=1.0, batch_priority=False, bfloat16=False, group_size=4 * 17 * 2):
    """E^3 as configs/eee_paper: token classifier, pre-logits, 2 members x 2 experts, blocks 1 and 3;
    ``group_size`` counts tokens of all members (4 images x 17 tokens x 2 members by default)."""
    ensemble = 2
    moe = dict(layers=(1, 3), num_experts=4, ensemble_size=ensemble, group_size=group_size,
               dropout_rate=0.0, split_rngs=True, router=vmoe_router(k, capacity_factor, batch_priority, bfloat16))
    return VisionTransformerMoeEnsemble(num_classes=CLASSES, patch_size=(PATCH, PATCH), hidden_size=WIDTH,
                                        classifier="token", representation_size=WIDTH, deterministic=True,
                                        encoder=encoder(moe))


def perturb(params, seed: int):
    """Move every parameter away from its initial value (zeros, ones) so that each one matters."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in sorted(flat.items()):
        value = np.asarray(value, np.float32)
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "scale":  # LayerNorm scales and SoftRouter's scale: around 1
            noise = 0.2 * rng.standard_normal(value.shape)
        elif name.startswith("head/"):  # zero-initialised: give the logits a useful size
            noise = 0.5 * rng.standard_normal(value.shape)
        elif leaf in ("bias", "cls", "pos_embedding"):
            noise = 0.1 * rng.standard_normal(value.shape)
        else:
            noise = 0.05 * rng.standard_normal(value.shape)
        out[name] = jnp.asarray((value + noise).astype(np.float32))
    return flax.traverse_util.unflatten_dict(out, sep="/")


def images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (count, IMAGE, IMAGE, 3), dtype=np.uint8)
    return pixels, pixels.astype(np.float32) / 255.0 * 2.0 - 1.0


def router_margins(model, params, x) -> float:
    """Smallest probability gap a routing decision depends on: between a token's k-th and (k+1)-th
    expert and, with BPR, between the top-1 priorities of two tokens of one group (the sort order).

    The router inputs are the captured ``LayerNorm_1`` outputs of the MoE blocks, grouped as vmoe
    groups them (E^3: tokens ordered image, token, member; each member has its own experts).
    """
    _, state = model.apply({"params": params}, x, capture_intermediates=lambda m, _: m.name == "LayerNorm_1",
                           mutable=["intermediates"])
    moe = model.encoder["moe"]
    router = moe["router"]
    members = moe.get("ensemble_size", 1)
    k = router["num_selected_experts"]
    smallest = np.inf
    for block in moe["layers"]:
        (y,) = state["intermediates"]["Encoder"][f"encoderblock_{block}"]["LayerNorm_1"]["__call__"]
        y = np.asarray(y, np.float64)
        kernel = np.asarray(params["Encoder"][f"encoderblock_{block}"]["Moe"]["Router"]["dense"]["kernel"], np.float64)
        if members > 1:
            y = y.reshape(-1, members, *y.shape[1:]).transpose(0, 2, 1, 3).reshape(-1, moe["group_size"], y.shape[-1])
            y = y.reshape(y.shape[0], -1, members, y.shape[-1])
            logits = np.einsum("gsmd,dme->gmse", y, kernel.reshape(kernel.shape[0], members, -1))
        else:
            logits = y.reshape(-1, moe["group_size"], y.shape[-1]) @ kernel
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ordered = -np.sort(-probs, axis=-1)
        smallest = min(smallest, (ordered[..., k - 1] - ordered[..., k]).min() if k < probs.shape[-1] else np.inf)
        if router["dispatcher"]["batch_priority"]:
            top1 = np.sort(ordered[..., 0].reshape(ordered.shape[0], -1), axis=-1)
            smallest = min(smallest, np.diff(top1, axis=-1).min())
    return float(smallest)


def digest(arrays: dict) -> dict:
    flat = flax.traverse_util.flatten_dict(arrays, sep="/")
    out = {}
    for name, value in sorted(flat.items()):
        value = np.asarray(value)
        out[name] = [list(value.shape), value.dtype.name,
                     hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]]
    return out


def save(prefix: Path, params) -> dict:
    ckpt_partitioned.save_checkpoint(str(prefix), params, num_shards=NUM_SHARDS,
                                     max_chunk_bytes=MAX_CHUNK_BYTES).wait()
    restored = ckpt_partitioned.restore_checkpoint(str(prefix), None)
    return digest(restored)


def main() -> None:
    jax.config.update("jax_platforms", "cpu")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    reference: dict[str, np.ndarray] = {}
    restored: dict[str, dict] = {}
    meta: dict = {"vmoe_commit": VMOE_COMMIT, "vision_transformer_commit": VIT_COMMIT,
                  "jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
                  "python": sys.version.split()[0], "max_chunk_bytes": MAX_CHUNK_BYTES,
                  "num_shards": NUM_SHARDS, "cases": {}}

    pixels8, x8 = images(8, 1234)
    pixels6, x6 = images(6, 5678)
    reference["images8"], reference["images6"] = pixels8, pixels6

    def clear_params(model, init_key: int, x, cases: dict, first_seed: int):
        """Perturbed parameters whose routing decisions have clear margins in every case; tries
        successive perturbation seeds from ``first_seed``."""
        init = model.init(jax.random.PRNGKey(init_key), x)["params"]
        for seed in range(first_seed, first_seed + 50):
            params = perturb(init, seed)
            margins = {case: router_margins(m, params, x) for case, (m, _) in cases.items() if m.encoder["moe"]
                       ["router"].get("num_selected_experts")}
            if all(v >= MARGIN for v in margins.values()):
                return params, seed, margins
        raise RuntimeError(f"no seed in [{first_seed}, {first_seed + 50}) gives routing margins >= {MARGIN}")

    def checkpoint(name: str, model, init_key: int, x, images_key: str, cases: dict, first_seed: int):
        params, seed, margins = clear_params(model, init_key, x, cases, first_seed)
        restored[name] = save(OUT / name, params)
        for case, (case_model, settings) in cases.items():
            logits, _ = case_model.apply({"params": params}, x)
            reference[f"{name}/{case}/logits"] = np.asarray(logits, np.float32)
            meta["cases"][f"{name}/{case}"] = {"checkpoint": name, "images": images_key, "perturb_seed": seed,
                                               "routing_margin": margins.get(case), **settings}
        return params

    def routed(fn, group_size: int, **kwargs):
        settings = {"k": kwargs["k"], "capacity_factor": kwargs["capacity_factor"],
                    "batch_priority": kwargs["batch_priority"], "bfloat16": kwargs.get("bfloat16", False),
                    "group_size": group_size}
        return fn(group_size=group_size, **kwargs), settings

    # --- V-MoE, token classifier, groups of 4 images.
    params = checkpoint("vmoe_tiny", vmoe_tiny(), 0, x8, "images8", {
        "nodrop": routed(vmoe_tiny, 68, k=2, capacity_factor=2.0, batch_priority=True),
        "bpr_drop": routed(vmoe_tiny, 68, k=2, capacity_factor=0.5, batch_priority=True),
        "vanilla_drop": routed(vmoe_tiny, 68, k=2, capacity_factor=0.5, batch_priority=False),
        "bpr_drop_bf16": routed(vmoe_tiny, 68, k=2, capacity_factor=0.5, batch_priority=True, bfloat16=True),
        "k1_vanilla": routed(vmoe_tiny, 68, k=1, capacity_factor=1.0, batch_priority=False),
    }, first_seed=10)

    # The same checkpoint with an index in the format before 2022-06-22 (no "version" key).
    index = ckpt_base.restore_checkpoint(str(OUT / "vmoe_tiny.index"))
    del index["version"]
    ckpt_base.save_checkpoint(str(OUT / "vmoe_tiny_v0.index"), index)
    # Its data files are byte copies of vmoe_tiny's; they are not kept (tests copy them likewise).
    copies = [OUT / f"vmoe_tiny_v0.data-{shard:05d}-of-{NUM_SHARDS:05d}" for shard in range(NUM_SHARDS)]
    for shard, copy in enumerate(copies):
        shutil.copyfile(OUT / f"vmoe_tiny.data-{shard:05d}-of-{NUM_SHARDS:05d}", copy)
    restored["vmoe_tiny_v0"] = digest(ckpt_partitioned.restore_checkpoint(str(OUT / "vmoe_tiny_v0"), params))
    for copy in copies:
        copy.unlink()

    # vmoe's vit_zoom of the position embedding, 4x4 grid + class token -> 6x6 grid + class token.
    pos = params["Encoder"]["posembed_input"]["pos_embedding"]
    zoomed = vmoe_rules.VitZoomTransformation(
        target_shape_dtype=jax.ShapeDtypeStruct((1, 37, WIDTH), jnp.float32), source=pos)()
    reference["vit_zoom/source"] = np.asarray(pos)
    reference["vit_zoom/target_6x6"] = np.asarray(zoomed)

    # --- V-MoE, GAP classifier with pre-logits, groups of 24 tokens (not whole images).
    checkpoint("vmoe_tiny_prelogits", vmoe_tiny_prelogits(), 1, x6, "images6", {
        "k1_group24": routed(vmoe_tiny_prelogits, 24, k=1, capacity_factor=1.0, batch_priority=True),
        "k2_group24_vanilla": routed(vmoe_tiny_prelogits, 24, k=2, capacity_factor=1.0, batch_priority=False),
    }, first_seed=11)

    # --- Soft MoE ViT. vmoe's SoftRouter always wraps its dispatcher in Bfloat16Dispatcher; the
    # "fp32" case runs the same code with that wrapper replaced by the identity.
    class Fp32Dispatch:
        def __init__(self, model):
            self.model, self.encoder = model, model.encoder

        def apply(self, *args, **kwargs):
            wrapper = soft_router.Bfloat16Dispatcher
            soft_router.Bfloat16Dispatcher = lambda dispatcher: dispatcher
            try:
                return self.model.apply(*args, **kwargs)
            finally:
                soft_router.Bfloat16Dispatcher = wrapper

    checkpoint("softmoe_tiny", softmoe_tiny(), 2, x8, "images8", {
        "bf16": (softmoe_tiny(), {"bfloat16": True}),
        "fp32": (Fp32Dispatch(softmoe_tiny()), {"bfloat16": False}),
    }, first_seed=12)

    # --- E^3: the model returns one row of logits per (image, member) (jnp.repeat order); vmoe's
    # evaluation averages the members' probabilities (evaluate/ensemble.py).
    cases = {
        "k1_vanilla": routed(eee_tiny, 136, k=1, capacity_factor=1.0, batch_priority=False),
        "k2_bpr_drop_group2": routed(eee_tiny, 68, k=2, capacity_factor=0.5, batch_priority=True),
        "k1_vanilla_bf16": routed(eee_tiny, 136, k=1, capacity_factor=1.0, batch_priority=False, bfloat16=True),
    }
    for _, settings in cases.values():
        settings["ensemble_size"] = 2
    checkpoint("eee_tiny", eee_tiny(), 3, x8, "images8", cases, first_seed=13)
    for case in cases:
        logits = jnp.asarray(reference[f"eee_tiny/{case}/logits"])
        reference[f"eee_tiny/{case}/ensemble_log_probs"] = np.asarray(
            vmoe_ensemble._ensemble_log_mean(logits, 2, jax.nn.log_softmax), np.float32)
        reference[f"eee_tiny/{case}/label_pred"] = np.asarray(vmoe_ensemble.label_pred_ensemble_softmax(logits, 2))

    (OUT / "restored.json").write_text(json.dumps(restored, sort_keys=True) + "\n")
    reference["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez_compressed(OUT / "reference.npz", **reference)
    for path in sorted(OUT.iterdir()):
        print(f"{path.name:45s} {os.path.getsize(path):8d}")


if __name__ == "__main__":
    main()
