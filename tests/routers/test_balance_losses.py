"""The balance losses of issue 23: DeepSeek-V3's sequence-wise, DeepSeek-V2's device-level, Qwen's
global-batch and ModuleFormer's mutual-information loss, each against values worked by hand or a
naive Python loop over the paper's formula, and each as emitted by the routers that use it."""

from __future__ import annotations

import math

import pytest
import torch

from moezoo.routers import GroupLimitedRouter, SigmoidRouter, TopKRouter
from moezoo.routers import losses as L


def _naive_balance(probs, choices, num_experts, k):
    """DeepSeek's sum_i f_i P_i for one set of T tokens, as Python loops: f_i = E/(kT) count_i."""
    tokens = len(probs)
    f = [num_experts / (k * tokens) * sum(i in row for row in choices) for i in range(num_experts)]
    p = [sum(row[i] for row in probs) / tokens for i in range(num_experts)]
    return f, p


def test_sequence_balance_hand_worked():
    # Sequence 1: f = 2/(1*2) [2, 0] = [2, 0], P = [0.7, 0.3] -> 1.4.
    # Sequence 2: f = [1, 1], P = [0.3, 0.7] -> 1.0. Mean 1.2.
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.5, 0.5], [0.1, 0.9]]])
    choices = torch.tensor([[[0], [0]], [[0], [1]]])
    assert L.sequence_balance_loss(probs, choices).item() == pytest.approx(1.2, rel=1e-6)


def test_sequence_balance_matches_a_naive_loop_and_the_switch_loss_per_sequence():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, 6, generator=g), -1)
    choices = probs.topk(2, dim=-1).indices
    per_sequence = []
    for s in range(3):
        f, p = _naive_balance(probs[s].tolist(), choices[s].tolist(), 6, 2)
        per_sequence.append(sum(a * b for a, b in zip(f, p)))
        # One sequence: the Switch loss E sum share_e P_e with share = count / (kT).
        assert L.sequence_balance_loss(probs[s:s + 1], choices[s:s + 1]).item() == pytest.approx(
            L.load_balancing_loss(probs[s], choices[s]).item(), rel=1e-6)
    assert L.sequence_balance_loss(probs, choices).item() == pytest.approx(sum(per_sequence) / 3, rel=1e-6)


def test_device_balance_hand_worked():
    # E = 4 on D = 2 devices, k = 1, T = 2, tokens choose experts 0 and 1 (both on device 0):
    # f = 4/(1*2) [1, 1, 0, 0] = [2, 2, 0, 0] -> f' = [2, 0]; P = [0.35, 0.3, 0.2, 0.15] -> P' = [0.65, 0.35].
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.3, 0.3, 0.2, 0.2]])
    assert L.device_balance_loss(probs, torch.tensor([[0], [1]]), 2).item() == pytest.approx(2 * 0.65, rel=1e-6)
    # One token per device: f' = [1, 1], P' sums to 1 -> 1.
    assert L.device_balance_loss(probs, torch.tensor([[0], [3]]), 2).item() == pytest.approx(1.0, rel=1e-6)


def test_device_balance_matches_a_naive_loop_and_reduces_to_the_expert_loss():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(9, 8, generator=g), -1)
    choices = probs.topk(3, dim=-1).indices
    f, p = _naive_balance(probs.tolist(), choices.tolist(), 8, 3)
    expected = sum(sum(f[d * 2:d * 2 + 2]) / 2 * sum(p[d * 2:d * 2 + 2]) for d in range(4))
    assert L.device_balance_loss(probs, choices, 4).item() == pytest.approx(expected, rel=1e-6)
    assert L.device_balance_loss(probs, choices, 8).item() == pytest.approx(
        L.load_balancing_loss(probs, choices).item(), rel=1e-6)
    with pytest.raises(ValueError, match="num_devices"):
        L.device_balance_loss(probs, choices, 3)


def test_global_balance_on_one_process_is_transformers_load_balancing_loss():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 6, generator=g)
    probs = torch.softmax(logits, -1)
    choices = probs.topk(2, dim=-1).indices
    # transformers' per-layer f_e sums to k (one layer, no mask); ours sums to 1.
    expected = load_balancing_loss_func((logits,), 6, 2) / 2
    torch.testing.assert_close(L.global_load_balancing_loss(probs, choices), expected)


def test_global_balance_counts_earlier_micro_batches():
    # E = 2, k = 1. Earlier micro-batches chose expert 0 three times; now one token chooses 1:
    # f = [3, 1] / 4, P = [0.2, 0.8] -> 2 * (0.75 * 0.2 + 0.25 * 0.8) = 0.7.
    probs = torch.tensor([[0.2, 0.8]])
    loss = L.global_load_balancing_loss(probs, torch.tensor([[1]]), torch.tensor([3.0, 0.0]))
    assert loss.item() == pytest.approx(0.7, rel=1e-6)


def test_mutual_information_hand_worked():
    # p(e|x1) = [0.9, 0.1], p(e|x2) = [0.1, 0.9]: H(e) = log 2, H(e|x) = -(0.9 ln 0.9 + 0.1 ln 0.1).
    logits = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log()
    conditional = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert L.mutual_information_loss(logits).item() == pytest.approx(conditional - math.log(2), abs=1e-6)
    # Every token uniform: MI = 0. Every token one-hot on its own expert, balanced: -MI = -log E.
    assert L.mutual_information_loss(torch.zeros(3, 4)).item() == pytest.approx(0.0, abs=1e-6)
    assert L.mutual_information_loss(torch.eye(4) * 50).item() == pytest.approx(-math.log(4), abs=1e-5)


def test_mutual_information_over_tasks_hand_worked():
    # Tasks: tokens 0, 1 -> task 0, p(e|0) = [0.7, 0.3]; token 2 -> task 1, p(e|1) = [0.2, 0.8].
    # p(task) = [2/3, 1/3]; marginal p(e) = [1.6/3, 1.4/3].
    logits = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.2, 0.8]]).log()
    groups = torch.tensor([0, 0, 1])

    def h(p):
        return -sum(x * math.log(x) for x in p)

    expected = 2 / 3 * h([0.7, 0.3]) + 1 / 3 * h([0.2, 0.8]) - h([1.6 / 3, 1.4 / 3])
    assert L.mutual_information_loss(logits, groups, 2).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="groups"):
        L.mutual_information_loss(logits, groups)


def test_sigmoid_and_group_limited_routers_emit_sequence_and_device_losses():
    torch.manual_seed(3)
    x = torch.randn(2 * 5, 8)
    router = SigmoidRouter(8, 6, k=2, sequence_length=5)
    routing = router(x)
    scores = torch.sigmoid(router.compute_logits(x))
    share = scores / scores.sum(-1, keepdim=True)
    chosen = scores.topk(2, dim=-1).indices
    f0, p0 = _naive_balance(share[:5].tolist(), chosen[:5].tolist(), 6, 2)
    f1, p1 = _naive_balance(share[5:].tolist(), chosen[5:].tolist(), 6, 2)
    expected = (sum(a * b for a, b in zip(f0, p0)) + sum(a * b for a, b in zip(f1, p1))) / 2
    assert routing.losses["sequence_balance"].item() == pytest.approx(expected, rel=1e-5)
    assert "sequence_balance" not in SigmoidRouter(8, 6, k=2)(x).losses
    with pytest.raises(ValueError, match="sequence_length"):
        SigmoidRouter(8, 6, k=2, sequence_length=4)(x)
    with pytest.raises(ValueError, match="sequence_length"):
        SigmoidRouter(8, 6, k=2, sequence_length=0)

    v2 = GroupLimitedRouter(8, 6, k=2, num_groups=3, topk_group=2, group_top=1, scores="softmax",
                            device_balance=True, sequence_length=5)
    routing = v2(x)
    probs = torch.softmax(v2.compute_logits(x), -1)
    chosen = torch.stack([routing.expert[:10], routing.expert[10:]], dim=1)
    f, p = _naive_balance(probs.tolist(), chosen.tolist(), 6, 2)
    expected = sum(sum(f[2 * d:2 * d + 2]) / 2 * sum(p[2 * d:2 * d + 2]) for d in range(3))
    assert routing.losses["device_balance"].item() == pytest.approx(expected, rel=1e-5)
    assert "sequence_balance" in routing.losses


def test_top_k_router_global_balance_accumulates_micro_batches_until_the_step():
    torch.manual_seed(4)
    router = TopKRouter(8, 4, k=2, global_balance=True, mutual_information=True).train()
    first, second = torch.randn(6, 8), torch.randn(5, 8)
    router(first)
    loss = router(second).losses["global_load_balancing"]
    probs = [torch.softmax(router.compute_logits(x), -1) for x in (first, second)]
    union = torch.cat([p.topk(2, dim=-1).indices for p in probs])
    share = torch.bincount(union.reshape(-1), minlength=4).float() / union.numel()
    assert loss.item() == pytest.approx(4 * (share * probs[1].mean(0)).sum().item(), rel=1e-6)
    router.update_after_step()
    alone = router(second).losses
    torch.testing.assert_close(alone["global_load_balancing"], alone["load_balancing"])
    torch.testing.assert_close(alone["mutual_information"],
                               L.mutual_information_loss(router.compute_logits(second)))
    router.eval()  # evaluation: this forward only, nothing accumulated
    router(first)
    assert router.pending_counts.sum().item() == 2 * 5


def test_losses_are_configured_in_yaml_and_weighted_by_the_layer():
    from jsonargparse import ArgumentParser

    from moezoo.layers import MoE, aux_loss
    from moezoo.routers import DSelectKRouter, Router

    parser = ArgumentParser()
    parser.add_argument("--router", type=Router)
    yaml = {
        "TopKRouter": "    k: 2\n    global_balance: true\n    mutual_information: true\n",
        "GroupLimitedRouter": "    k: 2\n    num_groups: 2\n    topk_group: 1\n    sequence_length: 3\n"
                              "    device_balance: true\n",
        "DSelectKRouter": "    k: 2\n    gamma: 0.5\n    per_token: false\n",
    }
    names = {"TopKRouter": ("global_load_balancing", "mutual_information"),
             "GroupLimitedRouter": ("sequence_balance", "device_balance"), "DSelectKRouter": ("selector_entropy",)}
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8)
    for cls, args in yaml.items():
        cfg = parser.parse_string(f"router:\n  class_path: moezoo.routers.{cls}\n  init_args:\n    dim: 8\n"
                                  f"    num_experts: 4\n{args}")
        router = parser.instantiate(cfg).router
        weights = {name: 0.5 + i for i, name in enumerate(names[cls])}
        layer = MoE(8, 6, 4, router=router, aux_loss_weights=weights, backend="torch")
        layer(x)
        expected = sum(w * layer.last_losses[name] for name, w in weights.items())
        torch.testing.assert_close(aux_loss(layer), expected)
        assert isinstance(router, DSelectKRouter) == (cls == "DSelectKRouter")


def test_mutual_information_matches_moduleformer():
    """ModuleFormer's own ``top_k_gating(aux_loss="mi")`` loss and its gradient at the gate weight
    (fixture: tests/data/make_moduleformer_mi_reference.py, github.com/IBM/ModuleFormer 850f1eb)."""
    import json
    from pathlib import Path

    import numpy as np

    data = np.load(Path(__file__).parent.parent / "data" / "moduleformer_mi_reference.npz")
    meta = json.loads(str(data["meta"]))
    for name in (n for n in meta if not n.startswith("_")):
        ref = {key.split("/", 1)[1]: torch.from_numpy(np.asarray(data[key])) for key in data.files
               if key.startswith(name + "/")}
        router = TopKRouter(meta[name]["dim"], meta[name]["experts"], k=meta[name]["k"], mutual_information=True)
        with torch.no_grad():
            router.gate.weight.copy_(ref["weight"])
        loss = router(ref["x"]).losses["mutual_information"]
        torch.testing.assert_close(loss, ref["loss"], atol=1e-6, rtol=1e-5)
        loss.backward()
        torch.testing.assert_close(router.gate.weight.grad, ref["weight_grad"], atol=1e-6, rtol=1e-5)
