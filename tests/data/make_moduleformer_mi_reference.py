"""Generate tests/data/moduleformer_mi_reference.npz from ModuleFormer's own gate (``aux_loss="mi"``).

CI never runs this script: it imports ``moduleformer/utils/gate.py`` of github.com/IBM/ModuleFormer
(commit 850f1eb7804fbd644ca60437277448c162350a6c) from the path given; no reference code is copied here.

Environment (Python 3.11, CPU; the file needs only torch):

    python3.11 -m venv --system-site-packages /tmp/venv-grin   # torch 2.14.1, numpy 2.4.6
    git clone https://github.com/IBM/ModuleFormer /tmp/refs/ModuleFormer
    git -C /tmp/refs/ModuleFormer checkout 850f1eb7804fbd644ca60437277448c162350a6c

Run from the repository root:

    /tmp/venv-grin/bin/python tests/data/make_moduleformer_mi_reference.py \
        --gate /tmp/refs/ModuleFormer/moduleformer/utils/gate.py --out tests/data

Per case: ``torch.manual_seed(seed)``; ``top_k_gating(dim, experts, k, gate_type="linear",
aux_loss="mi")`` in evaluation mode (no sampled top-k), its bias-free linear gate's weight replaced by
``scale * N(0, 1)`` (experts, dim), then ``x = N(0, 1)`` (tokens, dim); the forward's ``gate.loss``
(``acc_aux_loss=False``: the loss of this call alone) is stored with its gradient at the weight.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

# name: (seed, tokens, dim, experts, k, weight scale)
CASES = {"e8_k2": (0, 16, 6, 8, 2, 1.0), "e4_k1_sharp": (1, 10, 5, 4, 1, 3.0), "e16_k4_flat": (2, 32, 8, 16, 4, 0.1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", type=Path, required=True, help="ModuleFormer's moduleformer/utils/gate.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("moduleformer_gate", args.gate)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arrays, meta = {}, {}
    for name, (seed, tokens, dim, experts, k, scale) in CASES.items():
        torch.manual_seed(seed)
        gate = module.top_k_gating(dim, experts, k, gate_type="linear", aux_loss="mi").eval()
        with torch.no_grad():
            gate.w_gate[0].weight.copy_(scale * torch.randn(experts, dim))
        x = torch.randn(tokens, dim)
        gate(x)
        gate.loss.backward()
        arrays.update({f"{name}/x": x.numpy(), f"{name}/weight": gate.w_gate[0].weight.detach().numpy(),
                       f"{name}/loss": gate.loss.detach().numpy(),
                       f"{name}/weight_grad": gate.w_gate[0].weight.grad.numpy()})
        meta[name] = {"seed": seed, "tokens": tokens, "dim": dim, "experts": experts, "k": k, "scale": scale}
    meta["_torch"] = torch.__version__
    np.savez(args.out / "moduleformer_mi_reference.npz", meta=np.array(json.dumps(meta)), **arrays)


if __name__ == "__main__":
    main()
