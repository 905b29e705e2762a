"""Generate tests/data/grin_sparsemixer_reference.npz from GRIN-MoE's own ``sparsemixer``.

CI never runs this script: it needs the official function, which is not copied here. The official code
is ``modeling_grinmoe.py`` of the GRIN-MoE checkpoint (huggingface.co/microsoft/GRIN-MoE; the GitHub
repository microsoft/GRIN-MoE holds only a demo). This script reads that file (or any file that defines
the official ``mp`` autograd function and ``sparsemixer``), takes those two definitions out of it with
``ast`` and runs them unmodified; nothing else of the file is imported. Provenance and the keys:
tests/data/grin_sparsemixer_reference.md.

Environment (Python 3.11, CPU; the draws depend on torch's CPU generator, so use the torch that runs the
tests: 2.14.1 here):

    python3.11 -m venv --system-site-packages /tmp/venv-grin   # torch 2.14.1, numpy 2.4.6
    # modeling_grinmoe.py from huggingface.co/microsoft/GRIN-MoE (main), saved to /tmp/grin_ref/

Run from the repository root:

    /tmp/venv-grin/bin/python tests/data/make_grin_sparsemixer_reference.py \
        --modeling /tmp/grin_ref/modeling_grinmoe.py --out tests/data

Per case: a generator seeded with ``seed`` draws ``logits = scale * N(0, 1)`` (tokens, experts) and the
upstream gradient ``grad = N(0, 1)`` (tokens, 2); then ``torch.manual_seed(seed)`` and
``sparsemixer(logits, top_k=2, jitter_eps=eps, training=train)``; ``(multiplier * grad).sum()`` is
backpropagated to the logits.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import numpy as np
import torch

# name: (seed, tokens, experts, jitter_eps, logit scale, training)
CASES = {
    "train_eps0.01": (0, 64, 8, 0.01, 1.0, True),
    "train_eps0.3": (1, 64, 8, 0.3, 1.0, True),
    "train_eps0.5_small_logits": (2, 48, 16, 0.5, 0.2, True),
    "train_two_experts": (3, 32, 2, 0.4, 0.5, True),
    "eval_eps0.01": (4, 32, 8, 0.01, 1.0, False),
    "eval_eps0.3": (5, 32, 8, 0.3, 1.0, False),
}


def load_official(path: Path):
    """The official ``mp`` and ``sparsemixer`` definitions of ``path``, executed alone with torch."""
    tree = ast.parse(path.read_text())
    wanted = [node for node in tree.body if getattr(node, "name", None) in ("mp", "sparsemixer")]
    if sorted(node.name for node in wanted) != ["mp", "sparsemixer"]:
        raise SystemExit(f"{path} does not define both `mp` and `sparsemixer`")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["sparsemixer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modeling", type=Path, required=True, help="GRIN-MoE's modeling_grinmoe.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sparsemixer = load_official(args.modeling)
    arrays, meta = {}, {}
    for name, (seed, tokens, experts, eps, scale, train) in CASES.items():
        g = torch.Generator().manual_seed(seed)
        logits = (scale * torch.randn(tokens, experts, generator=g)).requires_grad_(True)
        grad = torch.randn(tokens, 2, generator=g)
        torch.manual_seed(seed)
        multiplier, selected = sparsemixer(logits, top_k=2, jitter_eps=eps, training=train)
        (multiplier * grad).sum().backward()
        arrays.update({f"{name}/logits": logits.detach().numpy(), f"{name}/grad": grad.numpy(),
                       f"{name}/multiplier": multiplier.detach().numpy(), f"{name}/selected": selected.numpy(),
                       f"{name}/logits_grad": logits.grad.numpy()})
        meta[name] = {"seed": seed, "tokens": tokens, "experts": experts, "jitter_eps": eps, "scale": scale,
                      "training": train}
    meta["_torch"] = torch.__version__
    np.savez(args.out / "grin_sparsemixer_reference.npz", meta=np.array(json.dumps(meta)), **arrays)


if __name__ == "__main__":
    main()
