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
by 0.7 N(0,1)], draw the input(s), run the layer, draw the cotangent with `torch.randn_like(out)`
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
# name: (seed, dim, experts, k, head_dim, tokens, batch, memory length or None for self-attention)
MOA_CASES = {
    "self_causal": (0, 16, 6, 3, 8, 7, 2, None),
    "self_causal_k1": (1, 12, 3, 1, 12, 5, 3, None),
    "cross": (2, 16, 4, 2, 8, 5, 2, 6),
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


def moa_case(attention_cls, seed, dim, experts, k, head_dim, tokens, batch, memory_len):
    torch.manual_seed(seed)
    cross = memory_len is not None
    layer = attention_cls(dim, k, self_attention=not cross, encoder_decoder_attention=cross,
                          num_expert=experts, head_dim=head_dim, cvloss=MOA_WEIGHTS["cv"],
                          switchloss=MOA_WEIGHTS["switch"], zloss=MOA_WEIGHTS["z"],
                          sample_topk=0, noisy_gating=False).eval()
    moe = layer.q_proj
    with torch.no_grad():
        moe.w_gate.copy_(MOA_GATE_STD * torch.randn_like(moe.w_gate))
    x = torch.randn(tokens, batch, dim, requires_grad=True)
    inputs = {"x": x}
    if cross:
        memory = torch.randn(memory_len, batch, dim, requires_grad=True)
        inputs["memory"] = memory
        out, _, aux = layer(x, memory, memory)
    else:
        mask = torch.triu(torch.full((tokens, tokens), float("-inf")), 1)
        out, _, aux = layer(x, x, x, attn_mask=mask)
    r = torch.randn_like(out)
    params = {"gate": moe.w_gate, "w_q": moe.experts.w, "w_o": moe.output_experts.w,
              "k_proj": layer.k_proj.weight, "v_proj": layer.v_proj.weight}
    ((out * r).sum() + aux).backward()

    # Each loss alone (coefficient 1), from the routing of that same forward.
    probs = torch.softmax(x.detach().transpose(0, 1).reshape(-1, dim) @ moe.w_gate.detach(), 1)
    gates = torch.zeros_like(probs).scatter(1, *reversed(probs.topk(moe.k, dim=1)))
    logits = x.detach().transpose(0, 1).reshape(-1, dim) @ moe.w_gate.detach()
    losses = {"loss_cv": moe.compute_cvloss(gates),
              "loss_switch": moe.compute_switchloss(probs, moe.expert_size),
              "loss_z": moe.compute_zloss(logits)}

    out_arrays = {**arrays(inputs), "out": out.detach().numpy().copy(), "r": r.numpy().copy(),
                  "aux_weighted": np.float64(aux.item())}
    out_arrays.update(arrays(params))
    out_arrays.update({f"grad_{n}": t.grad.numpy().copy() for n, t in {**inputs, **params}.items()})
    out_arrays.update({n: np.float64(v.item()) for n, v in losses.items()})
    meta = {"dim": dim, "num_experts": experts, "k": k, "head_dim": head_dim, "tokens": tokens,
            "batch": batch, "memory": memory_len, "weights": MOA_WEIGHTS,
            "layout": "time-major (T, B, D) like fairseq"}
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
