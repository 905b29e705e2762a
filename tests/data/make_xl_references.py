"""Generate tests/data/xl_attention_reference.npz from the SwitchHead/σ-MoE authors' training code.

CI never runs this script: it needs a RobertCsordas/moe_attention checkout (its `framework` package
imports matplotlib, scipy, PIL, requests and tqdm, its SwitchHead layer wandb and Triton). It imports
the reference; no reference code is copied here. Provenance and the keys: tests/data/xl_references.md.

Environment (Python 3.11, CPU):

    python3.11 -m venv /work/venvs/fx-xl
    /work/venvs/fx-xl/bin/pip install torch==2.13.0 numpy==2.4.6 scipy==1.17.1 matplotlib==3.11.2 \
        pillow==13.0.0 requests==2.34.2 tqdm==4.70.1 triton==3.8.0 wandb==0.31.0
    git clone https://github.com/RobertCsordas/moe_attention /work/refs/moe_attention
    git -C /work/refs/moe_attention checkout 7169ad370e68185ecddb592c623b8d550de725df

(torch 2.13.0 is the CPU wheel.) Run from the repository root (SwitchHead's CVMM kernels are Triton, run in its CPU interpreter):

    TRITON_INTERPRET=1 /work/venvs/fx-xl/bin/python tests/data/make_xl_references.py \
        --moe-attention /work/refs/moe_attention --out tests/data/xl_attention_reference.npz

The layer is `layers/transformer/multi_head_relative_pos_attention.py::FixedRelativeMultiheadAttention`
(the Transformer-XL attention of the papers' dense baselines), called the way
`models/transformer_language_model.py` calls it with `n_prev_states > 0`: keys and values from
`cat([memory, x], 1)`, `pos_offset = memory length`, a causal mask over the current segment only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from reference_shims import triton_single_autotune_config  # tests/data/, beside this script

SEED = 20241201
# name: (dim, heads, head_dim, batch, tokens, memory tokens)
DENSE_CASES = {
    "dense_memory": (16, 2, 8, 2, 5, 3),
    "dense_no_memory": (12, 3, 4, 2, 6, 0),
    "dense_long_memory": (8, 2, 6, 1, 3, 7),  # memory longer than the segment
}
TWO_SEGMENT = (16, 2, 8, 2, 4)  # dim, heads, head_dim, batch, tokens per segment
# SwitchHead-XL: (dim, heads, experts, k, head_dim, batch, tokens, memory tokens); dense q and k,
# σ-gated value and output experts (the sweeps' moe.att.q_expert=0, k_expert=0, variant full).
SWITCHHEAD_CASES = {
    "switchhead_memory": (16, 2, 4, 2, 8, 2, 5, 3),
    "switchhead_no_memory": (12, 3, 3, 1, 4, 1, 6, 0),
}
BIAS_STD = 0.5  # the reference zero-initialises the u/v biases; random ones test that they are used


def randomize(layer: torch.nn.Module) -> None:
    """Give every parameter a random value, so the test sees each one's role.

    Weights N(0, 1/fan_in), the u/v biases N(0, 0.5²); the learned logit scale keeps its
    initial 1/sqrt(head_dim).
    """
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("weight"):
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            elif name.startswith("global_"):
                p.copy_(BIAS_STD * torch.randn_like(p))


def attention(layer, attention_module, x, memory):
    """The LM's call: attend to cat([memory, x]), position offset = memory length, causal mask."""
    mask_cls = attention_module.AttentionMask
    causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), diagonal=1)
    if memory is None:
        return layer(x, x, mask_cls(None, causal))
    return layer(x, torch.cat([memory, x], 1), mask_cls(None, causal), pos_offset=memory.shape[1])


def parameters(layer) -> dict[str, torch.Tensor]:
    # s_bias is defined by RelativeAttentionBase but never used in the forward (no gradient).
    return {n: p for n, p in layer.named_parameters() if n != "s_bias"}


def one_segment(layer, attention_module, params, batch, tokens, mem_tokens, dim):
    """Draw x (and memory), run, draw r = randn_like(out), backprop sum(out * r); the arrays."""
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    memory = torch.randn(batch, mem_tokens, dim, requires_grad=True) if mem_tokens else None
    out = attention(layer, attention_module, x, memory)
    r = torch.randn_like(out)
    (out * r).sum().backward()
    arrays = {"x": x, "out": out, "r": r, **params,
              "grad_x": x.grad, **{f"grad_{n}": p.grad for n, p in params.items()}}
    if memory is not None:
        arrays.update({"memory": memory, "grad_memory": memory.grad})
    return arrays, params


def dense_case(module, dim, heads, head_dim, batch, tokens, mem_tokens):
    layer = module.FixedRelativeMultiheadAttention(dim, heads, dropout=0.0,
                                                   projection_size=head_dim).eval()
    randomize(layer)
    arrays, params = one_segment(layer, module, parameters(layer), batch, tokens, mem_tokens, dim)
    meta = {"dim": dim, "heads": heads, "head_dim": head_dim, "batch": batch, "tokens": tokens,
            "memory": mem_tokens, "params": {n: list(p.shape) for n, p in params.items()}}
    return arrays, meta


def two_segment_case(module, dim, heads, head_dim, batch, tokens):
    """Segment 2 attends to segment 1's (detached) input as memory, as the LM trains."""
    layer = module.FixedRelativeMultiheadAttention(dim, heads, dropout=0.0,
                                                   projection_size=head_dim).eval()
    randomize(layer)
    x1 = torch.randn(batch, tokens, dim, requires_grad=True)
    x2 = torch.randn(batch, tokens, dim, requires_grad=True)
    out1 = attention(layer, module, x1, None)
    out2 = attention(layer, module, x2, x1.detach())
    r1, r2 = torch.randn_like(out1), torch.randn_like(out2)
    ((out1 * r1).sum() + (out2 * r2).sum()).backward()
    params = parameters(layer)
    arrays = {"x1": x1, "x2": x2, "out1": out1, "out2": out2, "r1": r1, "r2": r2, **params,
              "grad_x1": x1.grad, "grad_x2": x2.grad,
              **{f"grad_{n}": p.grad for n, p in params.items()}}
    meta = {"dim": dim, "heads": heads, "head_dim": head_dim, "batch": batch, "tokens": tokens,
            "memory": "segment 1, detached"}
    return arrays, meta


def switchhead_case(module, attention_module, dim, heads, experts, k, head_dim, batch, tokens,
                    mem_tokens):
    """`FullMoeRelativeAttention` with the reference's own (seeded) init, called like the LM."""
    layer = module.FullMoeRelativeAttention(
        dim, heads, experts, dropout=0.0, projection_size=head_dim, init_std_scale=1.0, moe_k=k,
        selection_mode="sigmoid", q_expert=False, k_expert=False, v_expert=True,
        o_expert=True).eval()
    arrays, params = one_segment(layer, attention_module, dict(layer.named_parameters()), batch,
                                 tokens, mem_tokens, dim)
    meta = {"dim": dim, "heads": heads, "experts": experts, "k": k, "head_dim": head_dim,
            "batch": batch, "tokens": tokens, "memory": mem_tokens,
            "params": {n: list(p.shape) for n, p in params.items()}}
    return arrays, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe-attention", type=Path, required=True,
                        help="RobertCsordas/moe_attention checkout at 7169ad3")
    parser.add_argument("--out", type=Path, default=Path("tests/data/xl_attention_reference.npz"))
    args = parser.parse_args()
    sys.path.insert(0, str(args.moe_attention))
    triton_single_autotune_config()  # before any reference import: its `layers` package imports cvmm
    import layers.transformer.full_moe_relative_attention as switchhead
    import layers.transformer.multi_head_relative_pos_attention as module

    torch.manual_seed(SEED)
    cases = {name: dense_case(module, *case) for name, case in DENSE_CASES.items()}
    cases["two_segments"] = two_segment_case(module, *TWO_SEGMENT)
    cases.update({name: switchhead_case(switchhead, module, *case)
                  for name, case in SWITCHHEAD_CASES.items()})
    out = {f"{case}/{key}": t.detach().numpy().copy()
           for case, (arrays, _) in cases.items() for key, t in arrays.items()}
    meta = {case: m for case, (_, m) in cases.items()}
    meta["versions"] = {"torch": torch.__version__, "moe_attention": "7169ad3"}
    out["meta"] = np.str_(json.dumps(meta))
    np.savez_compressed(args.out, **out)
    print(f"wrote {len(out)} arrays to {args.out}")


if __name__ == "__main__":
    main()
