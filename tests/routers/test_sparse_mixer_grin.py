"""SparseMixer's gradient estimator against GRIN-MoE's own ``sparsemixer`` (arXiv 2409.12136): the
same choices, forward multipliers (Heun's midpoint included) and logits gradients, in training (same
seed, so the same Gumbel and midpoint draws) and at evaluation. Fixture:
tests/data/make_grin_sparsemixer_reference.py (provenance in grin_sparsemixer_reference.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moezoo.routers import SparseMixerRouter
from moezoo.routers import functional as RF

DATA = Path(__file__).parent.parent / "data" / "grin_sparsemixer_reference.npz"
REFERENCE = np.load(DATA)
META = json.loads(str(REFERENCE["meta"]))
CASES = sorted(name for name in META if not name.startswith("_"))


def _case(name):
    return {key.split("/", 1)[1]: torch.from_numpy(REFERENCE[key]) for key in REFERENCE.files
            if key.startswith(name + "/")}


@pytest.mark.parametrize("name", CASES)
def test_sparse_mixer_matches_grin(name):
    case, meta = _case(name), META[name]
    logits = case["logits"].clone().requires_grad_(True)
    torch.manual_seed(meta["seed"])
    weight, index = RF.sparse_mixer(logits, meta["jitter_eps"], meta["training"])
    torch.testing.assert_close(index, case["selected"], rtol=0, atol=0)
    torch.testing.assert_close(weight.detach(), case["multiplier"], rtol=0, atol=1e-6)
    (weight * case["grad"]).sum().backward()
    torch.testing.assert_close(logits.grad, case["logits_grad"], rtol=0, atol=1e-6)


def test_fixture_exercises_the_estimator():
    """The training cases sample experts other than the plain top 2 and keep several experts inside
    the mask (multipliers well below 1), so the comparison is not of a plain top-2."""
    train = [_case(n) for n in CASES if META[n]["training"]]
    best2 = torch.cat([c["logits"].topk(2, dim=-1).indices for c in train])
    assert (torch.cat([c["selected"] for c in train]) != best2).any()
    assert (torch.cat([c["multiplier"].reshape(-1) for c in train]) < 0.5).any()


def test_router_routes_with_the_grin_estimator():
    """The router: the gate's logits through the same function, choice-major assignments."""
    case, meta = _case("train_eps0.3"), META["train_eps0.3"]
    tokens, experts = case["logits"].shape
    router = SparseMixerRouter(experts, experts, jitter_eps=meta["jitter_eps"]).train()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(experts))
    x = case["logits"].clone().requires_grad_(True)  # identity gate: the logits are x
    torch.manual_seed(meta["seed"])
    routing = router(x)
    torch.testing.assert_close(routing.expert, case["selected"].t().reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(routing.weight.detach(), case["multiplier"].t().reshape(-1), rtol=0, atol=1e-6)
    (routing.weight * case["grad"].t().reshape(-1)).sum().backward()
    torch.testing.assert_close(x.grad, case["logits_grad"], rtol=0, atol=1e-6)
