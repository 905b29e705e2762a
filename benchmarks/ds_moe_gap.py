"""DS-MoE (arXiv 2404.05567) at tiny scale: a model trained densely (every expert, MI loss 0.01) evaluated
densely and with top-k sparse inference, on scikit-learn's handwritten digits (one seed).

The model: an 8x8 digit as 8 row tokens of 8 pixels -> linear 32 -> 2 pre-norm residual MoE blocks
(8 ReLU experts of 64, ``DenseTrainingRouter``) -> mean pool -> 10 classes; Adam, 600 steps, batch 64.

    python benchmarks/ds_moe_gap.py

Writes benchmarks/results/ds_moe_gap.json: test accuracy with all experts and with the top k = 1, 2, 4.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from moezoo.layers import MoE, aux_loss
from moezoo.routers import DenseTrainingRouter

ROOT = Path(__file__).resolve().parents[1]
EXPERTS, STEPS, MI_WEIGHT = 8, 600, 0.01


class Net(nn.Module):
    """(B, 8, 8) -> (B, 10); ``set_k`` sets the evaluation top-k of every router."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.moes = nn.ModuleList(
            MoE(dim, 64, EXPERTS, DenseTrainingRouter(dim, EXPERTS, k=1), activation="relu", backend="torch",
                aux_loss_weights={"mutual_information": MI_WEIGHT}) for _ in range(2))
        self.head = nn.Linear(dim, 10)

    def set_k(self, k: int) -> None:
        for moe in self.moes:
            moe.router.k = k

    def forward(self, x):
        h = self.embed(x)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.head(h.mean(dim=1))


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y))
    train, test = order[:1400], order[1400:]
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(STEPS):
        batch = train[torch.randint(len(train), (64,))]
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch]) + aux_loss(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        # The training-mode forward is the dense mixture (no dropout anywhere in this model).
        dense = (net.train()(x[test]).argmax(1) == y[test]).float().mean().item()
        net.eval()
        sparse = {}
        for k in (1, 2, 4):
            net.set_k(k)
            sparse[k] = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    record = {"test_images": len(test), "steps": STEPS, "experts": EXPERTS, "mi_weight": MI_WEIGHT, "seed": 0,
              "dense_accuracy": round(dense, 4),
              "sparse_accuracy": {f"top{k}": round(v, 4) for k, v in sparse.items()},
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1}}
    print(json.dumps(record))
    (ROOT / "benchmarks/results/ds_moe_gap.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
