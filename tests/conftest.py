"""Shared fixtures and independent reference implementations for the tests."""

from __future__ import annotations

import os

# Triton kernels run in Triton's CPU interpreter in this suite; the choice is made when triton is
# first imported, so it is set here, before anything imports torch or triton. On a GPU machine run
# the suite with TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).parent / "data"


def load_golden(path: Path) -> dict[str, np.ndarray]:
    """A golden-data archive: arrays by name, and ``meta`` (a JSON string) decoded."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    data["meta"] = json.loads(str(data["meta"]))
    return data


@pytest.fixture(scope="session")
def vmoe_reference() -> dict[str, np.ndarray]:
    """Golden data produced by running google-research/vmoe (see tests/data/vmoe_reference.md)."""
    return load_golden(DATA / "vmoe_reference.npz")


@pytest.fixture(scope="session")
def time_moe_reference() -> dict[str, np.ndarray]:
    """Golden data produced by running Time-MoE/Time-MoE (see tests/data/time_moe_reference.md)."""
    return load_golden(DATA / "time_moe_reference" / "expected.npz")



def naive_expert_mlp(x, token, expert, weight, w_in, w_out, activation="gelu", b_in=None, b_out=None, gated=False):
    """Per-assignment Python loop: the independent reference for every expert_mlp backend."""
    act = {
        "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
        "silu": torch.nn.functional.silu,
        "relu": torch.relu,
    }[activation]
    out = torch.zeros(x.shape[0], w_out.shape[-1], dtype=x.dtype)
    rows = []
    for a in range(token.numel()):
        t, e = int(token[a]), int(expert[a])
        h = x[t] @ w_in[e]
        if b_in is not None:
            h = h + b_in[e]
        if gated:
            g, u = h.chunk(2)
            h = act(g) * u
        else:
            h = act(h)
        y = h @ w_out[e]
        if b_out is not None:
            y = y + b_out[e]
        rows.append((t, weight[a] * y))
    for t, y in rows:
        out = out.index_add(0, torch.tensor([t]), y.unsqueeze(0).to(out.dtype))
    return out


def digits_test_split(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits test split as the model cards describe it, built here from scikit-learn itself:
    stratified 70/15/15 with seed 0 (the last 15 %, 270 images), pixels 0..16 scaled to [-1, 1],
    bilinear resize to ``image_size``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    _, rest = train_test_split(index, test_size=0.3, stratify=digits.target, random_state=0)
    _, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
    images = torch.tensor(digits.images[test], dtype=torch.float32)[:, None] / 8.0 - 1.0
    images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                             align_corners=False)
    return images, torch.tensor(digits.target[test])


@torch.no_grad()
def evaluate_digits_by_hand(model, images, labels, batch_size: int = 64) -> tuple[int, float, int]:
    """(correct, mean cross-entropy, examples) of a classifier by a plain loop: batches of
    ``batch_size`` in order (the cards' protocol: capacity drops depend on batch composition),
    argmax against the labels, and -log softmax of the true class in float64."""
    model.eval()
    correct, nll = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size]).double()
        target = labels[start : start + batch_size]
        correct += int((logits.argmax(-1) == target).sum())
        nll += float((torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None])[:, 0]).sum())
    return correct, nll / len(labels), len(labels)
