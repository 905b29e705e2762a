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
