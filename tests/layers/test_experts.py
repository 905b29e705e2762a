"""The expert bank: its dispatch options against hand-written references, and its expert count."""

import pytest
import torch

from moezoo.layers import Experts, LinearExperts, MoE
from moezoo.routers import TopKRouter
from moezoo.routers.routing import Routing
from tests.conftest import naive_expert_mlp


def _routing(tokens: int, experts: int, seed: int) -> Routing:
    g = torch.Generator().manual_seed(seed)
    token = torch.cat([torch.arange(tokens), torch.randint(0, tokens, (tokens // 2,), generator=g)])
    expert = torch.randint(0, experts, token.shape, generator=g)
    return Routing(token, expert, torch.rand(token.shape, generator=g), tokens, experts)


def test_bfloat16_dispatch_rounds_expert_inputs_and_outputs_only():
    torch.manual_seed(0)
    bank = Experts(12, 20, 4, "gelu_tanh", bfloat16_dispatch=True)
    x = torch.randn(9, 12) * 3
    routing = _routing(9, 4, 1)
    out = bank(x, routing)
    # vmoe's dispatcher.bfloat16: expert inputs and outputs in bf16; the experts, the combine weights
    # and the combine sum in fp32.
    rows = x.to(torch.bfloat16).float()[routing.token]
    expected = torch.zeros(9, 12, dtype=torch.float64)
    for a in range(routing.num_assignments):
        e = int(routing.expert[a])
        h = torch.nn.functional.gelu(rows[a] @ bank.w_in[e] + bank.b_in[e], approximate="tanh")
        y = (h @ bank.w_out[e] + bank.b_out[e]).to(torch.bfloat16).double()
        expected[routing.token[a]] += routing.weight[a].double() * y
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)
    plain = naive_expert_mlp(x.double(), routing.token, routing.expert, routing.weight.double(), bank.w_in.double(),
                             bank.w_out.double(), "gelu_tanh", bank.b_in.double(), bank.b_out.double())
    assert (out.double() - plain).abs().max() > 1e-4  # the rounding really happened


def test_linear_experts_equal_a_per_assignment_loop():
    torch.manual_seed(2)
    bank = LinearExperts(5, 7, 3, bias=True)
    with torch.no_grad():
        bank.bias.normal_()
    x, routing = torch.randn(6, 5), _routing(6, 3, 3)
    expected = torch.zeros(6, 7)
    for a in range(routing.num_assignments):
        t, e = int(routing.token[a]), int(routing.expert[a])
        expected[t] += routing.weight[a] * (x[t] @ bank.weight[e] + bank.bias[e])
    torch.testing.assert_close(bank(x, routing), expected, atol=1e-6, rtol=1e-5)


def test_the_bank_owns_the_expert_count_and_checks_routings_against_it():
    moe = MoE(8, 16, 4, TopKRouter(8, 4, k=2))
    assert moe.num_experts == moe.experts.num_experts == moe.experts.num_local_experts == 4
    with pytest.raises(ValueError, match="routing is over 5 experts but the bank has num_experts=4"):
        moe.experts(torch.randn(3, 8), _routing(3, 5, 0))
    with pytest.raises(ValueError, match="backend must be one of"):
        Experts(8, 16, 4, backend="cuda")
    with pytest.raises(ValueError, match="num_experts must be an int >= 1"):
        LinearExperts(8, 16, 0)
