"""DS-MoE's router: every expert with softmax weights in training, exactly k at evaluation; the MI loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moezoo.layers import MoE
from moezoo.routers import DenseTrainingRouter
from moezoo.routers.losses import mutual_information_loss


def test_training_sends_every_token_to_every_expert_with_softmax_weights():
    torch.manual_seed(0)
    router = DenseTrainingRouter(5, 4, k=2).train()
    x = torch.randn(6, 5)
    routing = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), dim=-1)
    assert routing.num_assignments == 6 * 4
    assert sorted(zip(routing.token.tolist(), routing.expert.tolist())) == [(t, e) for t in range(6) for e in range(4)]
    assert torch.allclose(routing.dense_weights(), probs, atol=1e-6)
    assert routing.tokens_per_expert().tolist() == [6, 6, 6, 6] and routing.stats["dropped_fraction"] == 0


@pytest.mark.parametrize("normalize", [False, True])
def test_evaluation_keeps_exactly_k(normalize):
    torch.manual_seed(1)
    router = DenseTrainingRouter(5, 6, k=2, normalize=normalize).eval()
    x = torch.randn(7, 5)
    routing = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), dim=-1)
    top = torch.argsort(probs, dim=-1, descending=True)[:, :2]
    expected = torch.zeros_like(probs).scatter(1, top, probs.gather(1, top))
    if normalize:
        expected = expected / expected.sum(dim=1, keepdim=True)
    assert routing.num_assignments == 7 * 2
    assert torch.equal(torch.bincount(routing.token, minlength=7), torch.full((7,), 2))
    assert torch.allclose(routing.dense_weights(), expected, atol=1e-6)


def test_mutual_information_loss_hand_worked():
    # DS-MoE's loss is ModuleFormer's (moezoo.routers.losses), on the logits (log-probabilities here).
    # Near one-hot rows spread evenly: H(marginal) = log 2, H(e|x) ~ 0 -> -log 2.
    assert math.isclose(mutual_information_loss(torch.eye(2) * 50).item(), -math.log(2), rel_tol=1e-5)
    # Identical rows: the marginal is the row, so the two entropies cancel.
    assert abs(mutual_information_loss(torch.tensor([[0.9, 0.1], [0.9, 0.1]]).log()).item()) < 1e-6
    # Rows (0.8, 0.2), (0.4, 0.6): marginal (0.6, 0.4).
    def h(*p):
        return -sum(q * math.log(q) for q in p)
    expected = (h(0.8, 0.2) + h(0.4, 0.6)) / 2 - h(0.6, 0.4)
    got = mutual_information_loss(torch.tensor([[0.8, 0.2], [0.4, 0.6]]).log()).item()
    assert math.isclose(got, expected, rel_tol=1e-5)


def test_layer_is_dense_in_training_sparse_at_evaluation():
    torch.manual_seed(2)
    layer = MoE(4, 8, 3, DenseTrainingRouter(4, 3, k=1), activation="relu", bias=False, backend="torch")
    x = torch.randn(5, 4)
    probs = torch.softmax(x @ layer.router.gate.weight.t(), dim=-1)
    e = layer.experts
    outs = torch.stack([F.relu(x @ e.w_in[j]) @ e.w_out[j] for j in range(3)], dim=1)  # (5, 3, 4)
    dense = (probs.unsqueeze(-1) * outs).sum(dim=1)
    assert torch.allclose(layer.train()(x), dense, atol=1e-5)
    best = probs.argmax(dim=1)
    sparse = probs.gather(1, best[:, None]) * outs[torch.arange(5), best]
    assert torch.allclose(layer.eval()(x), sparse, atol=1e-5)
    assert set(layer.last_losses) == {"mutual_information", "z_loss"}
