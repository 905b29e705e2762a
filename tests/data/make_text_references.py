"""Generate tests/data/text_moa_reference.npz and text_switchhead_reference.npz from the public code.

CI never runs this script: it needs the two reference checkouts (and Triton, run in its CPU
interpreter). It imports them; no reference code is copied here. Provenance and the keys:
tests/data/text_references.md.

Environment (Python 3.11, CPU):

    python3.11 -m venv /work/venvs/fx-text
    /work/venvs/fx-text/bin/pip install torch==2.14.1 triton==3.8.0 numpy==2.4.6 packaging
    git clone https://github.com/yikangshen/MoA /work/refs/MoA
    git -C /work/refs/MoA checkout 96c33ca33993820aec3f0b669739e39a18fd3223
    git clone https://github.com/RobertCsordas/switchhead /work/refs/switchhead
    git -C /work/refs/switchhead checkout 0bb2f61d55bed44ce2e99b5164c9d84554a3b020

Run from the repository root (the interpreter flag must be set before Triton is imported):

    TRITON_INTERPRET=1 /work/venvs/fx-text/bin/python tests/data/make_text_references.py \
        --moa /work/refs/MoA --switchhead /work/refs/switchhead --out tests/data

Per case: `torch.manual_seed(seed)`, build the layer (its own init), [MoA: replace the zero gate
by 0.7 N(0,1), and for noisy gating the zero noise weights by 0.5 N(0,1)], draw the input(s), [MoA in
training: store the generator state], run the layer, draw the cotangent with `torch.randn_like(out)`
(it keeps out's strides, so the draw order follows out's memory layout), backpropagate.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from reference_shims import triton_single_autotune_config  # tests/data/, beside this script

MOA_WEIGHTS = {"cv": 0.1, "switch": 0.01, "z": 0.001}
MOA_GATE_STD = 0.7  # the zero-initialised gate would tie every top-k
MOA_NOISE_STD = 0.5  # the zero-initialised noise weights would make the noise constant
# name: (seed, dim, experts, k, head_dim, tokens, batch, memory length or None for self-attention[,
# options: train (training mode), noisy (--gating noisy), sample_topk, query_lengths / key_lengths
# (padding masks: True after each sequence's length), causal (default: self-attention only)])
MOA_CASES = {
    "self_causal": (0, 16, 6, 3, 8, 7, 2, None),
    "self_causal_k1": (1, 12, 3, 1, 12, 5, 3, None),
    "cross": (2, 16, 4, 2, 8, 5, 2, 6),
    "noisy_train": (3, 16, 6, 3, 8, 7, 2, None, {"train": True, "noisy": True}),
    "sampled_topk_train": (4, 16, 6, 3, 8, 7, 2, None, {"train": True, "sample_topk": 1}),
    "query_padding": (5, 12, 4, 2, 6, 6, 3, None, {"query_lengths": [6, 4, 2], "key_lengths": [6, 4, 2],
                                                   "causal": False}),
    "cross_padding": (6, 16, 4, 2, 8, 5, 2, 7, {"query_lengths": [5, 3], "key_lengths": [7, 4]}),
}
# name: (seed, dim, heads, experts, k, head_dim, batch, tokens, rotate_fraction)
SWITCHHEAD_CASES = {
    "rope": (0, 16, 2, 3, 2, 8, 2, 6, 0.5),
    "rope_k1_full_rotation": (1, 12, 3, 4, 1, 6, 1, 7, 1.0),
    "one_expert": (2, 12, 3, 1, 1, 4, 2, 5, 0.5),
}


def install_fairseq_shim() -> None:
    """The four fairseq symbols MoA's layer imports, with fairseq's behaviour in this setting.

    softmax in float32; no incremental decoding, so `with_incremental_state` is the identity;
    dropout (p=0 here); `quant_noise` returns the module, as fairseq does for q_noise=0.
    """
    class FairseqDropout(torch.nn.Module):
        def __init__(self, p: float, module_name: str | None = None):
            super().__init__()
            self.p = p

        def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
            return F.dropout(x, p=self.p, training=self.training, inplace=inplace)

    modules = {name: types.ModuleType(name) for name in (
        "fairseq", "fairseq.utils", "fairseq.incremental_decoding_utils", "fairseq.modules",
        "fairseq.modules.fairseq_dropout", "fairseq.modules.quant_noise")}
    modules["fairseq.utils"].softmax = \
        lambda x, dim, onnx_trace=False: F.softmax(x.float(), dim=dim, dtype=torch.float32)
    modules["fairseq"].utils = modules["fairseq.utils"]
    modules["fairseq.incremental_decoding_utils"].with_incremental_state = lambda cls: cls
    modules["fairseq.modules.fairseq_dropout"].FairseqDropout = FairseqDropout
    modules["fairseq.modules.quant_noise"].quant_noise = lambda module, p, block_size: module
    sys.modules.update(modules)


def install_triton_cpu_shims() -> None:
    """Let SwitchHead's Triton CVMM run in Triton's CPU interpreter, its kernels unchanged.

    Its autograd function makes a sentinel with `.cuda()`: keep it on the CPU; and one autotune
    config per kernel (reference_shims.py says why).
    """
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    triton_single_autotune_config()


def arrays(named: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().numpy().copy() for name, t in named.items()}


def padding(lengths: list[int] | None, total: int) -> torch.Tensor | None:
    """(B, total) bool, True at the positions after each sequence's length (fairseq's padding mask)."""
    if lengths is None:
        return None
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def spy_losses(moe) -> dict[str, torch.Tensor]:
    """Record each loss the reference's gating computes (coefficient 1), from its own inputs."""
    seen = {}
    for name, method in (("loss_cv", "compute_cvloss"), ("loss_switch", "compute_switchloss"),
                         ("loss_z", "compute_zloss")):
        original = getattr(moe, method)

        def spy(*args, original=original, name=name):
            value = original(*args)
            seen[name] = value.detach() if torch.is_tensor(value) else torch.tensor(float(value))
            return value

        setattr(moe, method, spy)  # an instance attribute: the class and its code are untouched
    return seen


def moa_case(attention_cls, seed, dim, experts, k, head_dim, tokens, batch, memory_len, options=None):
    options = options or {}
    torch.manual_seed(seed)
    cross = memory_len is not None
    train = options.get("train", False)
    layer = attention_cls(dim, k, self_attention=not cross, encoder_decoder_attention=cross,
                          num_expert=experts, head_dim=head_dim, cvloss=MOA_WEIGHTS["cv"],
                          switchloss=MOA_WEIGHTS["switch"], zloss=MOA_WEIGHTS["z"],
                          sample_topk=options.get("sample_topk", 0),
                          noisy_gating=options.get("noisy", False)).train(train)
    moe = layer.q_proj
    with torch.no_grad():
        moe.w_gate.copy_(MOA_GATE_STD * torch.randn_like(moe.w_gate))
        if moe.noisy_gating:
            moe.w_noise.copy_(MOA_NOISE_STD * torch.randn_like(moe.w_noise))
    x = torch.randn(tokens, batch, dim, requires_grad=True)
    inputs = {"x": x}
    query_mask = padding(options.get("query_lengths"), tokens)
    key_mask = padding(options.get("key_lengths"), memory_len if cross else tokens)
    losses = spy_losses(moe)
    if cross:
        memory = torch.randn(memory_len, batch, dim, requires_grad=True)
        inputs["memory"] = memory
        rng = torch.get_rng_state()
        out, _, aux = layer(x, memory, memory, query_padding_mask=query_mask, key_padding_mask=key_mask)
    else:
        causal = options.get("causal", True)
        mask = torch.triu(torch.full((tokens, tokens), float("-inf")), 1) if causal else None
        rng = torch.get_rng_state()
        out, _, aux = layer(x, x, x, attn_mask=mask, query_padding_mask=query_mask, key_padding_mask=key_mask)
    r = torch.randn_like(out)
    params = {"gate": moe.w_gate, "w_q": moe.experts.w, "w_o": moe.output_experts.w,
              "k_proj": layer.k_proj.weight, "v_proj": layer.v_proj.weight}
    if moe.noisy_gating:
        params["noise"] = moe.w_noise
    ((out * r).sum() + aux).backward()

    out_arrays = {**arrays(inputs), "out": out.detach().numpy().copy(), "r": r.numpy().copy(),
                  "aux_weighted": np.float64(aux.item())}
    out_arrays.update(arrays(params))
    out_arrays.update({f"grad_{n}": t.grad.numpy().copy() for n, t in {**inputs, **params}.items()})
    out_arrays.update({n: np.float64(v.item()) for n, v in losses.items()})
    if train:
        out_arrays["rng_state"] = rng.numpy().copy()
    for name, mask in (("query_padding_mask", query_mask), ("key_padding_mask", key_mask)):
        if mask is not None:
            out_arrays[name] = mask.numpy().copy()
    meta = {"dim": dim, "num_experts": experts, "k": k, "head_dim": head_dim, "tokens": tokens,
            "batch": batch, "memory": memory_len, "weights": MOA_WEIGHTS,
            "layout": "time-major (T, B, D) like fairseq", "train": train,
            "noisy": bool(moe.noisy_gating), "sample_topk": options.get("sample_topk", 0),
            "causal": (not cross) and options.get("causal", True)}
    return out_arrays, meta


def switchhead_case(switchhead_cls, seed, dim, heads, experts, k, head_dim, batch, tokens,
                    rotate_fraction):
    torch.manual_seed(seed)
    layer = switchhead_cls(dim, heads, experts, d_head=head_dim, moe_k=k, init_scale=1.0,
                           rotate_fraction=rotate_fraction).eval()
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    out, _ = layer(x, x, x, mask=None)
    r = torch.randn_like(out)
    (out * r).sum().backward()
    params = dict(layer.named_parameters())
    out_arrays = {"x": x.detach().numpy().copy(), "out": out.detach().numpy().copy(),
                  "r": r.numpy().copy()}
    out_arrays.update(arrays(params))
    out_arrays["grad_x"] = x.grad.numpy().copy()
    out_arrays.update({f"grad_{n}": p.grad.numpy().copy() for n, p in params.items()})
    meta = {"dim": dim, "num_heads": heads, "num_experts": experts, "k": k, "head_dim": head_dim,
            "batch": batch, "tokens": tokens, "rotate_fraction": rotate_fraction,
            "params": {n: list(p.shape) for n, p in params.items()}}
    return out_arrays, meta


def save(path: Path, cases: dict[str, tuple[dict, dict]]) -> None:
    out = {f"{case}/{key}": value for case, (arrs, _) in cases.items() for key, value in arrs.items()}
    out["meta"] = np.str_(json.dumps({case: meta for case, (_, meta) in cases.items()}))
    np.savez_compressed(path, **out)
    print(f"wrote {len(out)} arrays to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moa", type=Path, required=True, help="yikangshen/MoA checkout at 96c33ca")
    parser.add_argument("--switchhead", type=Path, required=True,
                        help="RobertCsordas/switchhead checkout at 0bb2f61")
    parser.add_argument("--out", type=Path, default=Path("tests/data"))
    args = parser.parse_args()

    install_fairseq_shim()
    sys.path.insert(0, str(args.moa))
    from moa_layer.moa_attention import MultiheadAttention

    save(args.out / "text_moa_reference.npz",
         {name: moa_case(MultiheadAttention, *case) for name, case in MOA_CASES.items()})

    install_triton_cpu_shims()
    sys.path.insert(0, str(args.switchhead))
    from switchhead import SwitchHeadRope

    save(args.out / "text_switchhead_reference.npz",
         {name: switchhead_case(SwitchHeadRope, *case) for name, case in SWITCHHEAD_CASES.items()})


if __name__ == "__main__":
    main()
