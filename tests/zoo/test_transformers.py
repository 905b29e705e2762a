"""moezoo.from_transformers against the unconverted transformers model itself, on the same weights:
logits in evaluation, the loss (auxiliary loss included) and every gradient in training (random draws
seeded), router logits, generation with the KV cache, gradient checkpointing, and save_pretrained read
back by plain transformers in a process that never imports moezoo."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import moezoo
from moezoo.layers import aux_loss, update_routers
from moezoo.layers.routed import POOLED_LOAD_BALANCING
from moezoo.routers import GroupLimitedRouter, SparseMixerRouter, TopKRouter
from moezoo.zoo.hf import ARCHITECTURES, TransformersMoE, supported, transformers_layout
from tests.zoo.tiny_transformers import CONFIGS, tiny_model, tokens

ROOT = Path(__file__).resolve().parents[2]
TYPES = sorted(CONFIGS)
#: Training-mode randomness of the blocks, turned on so that the seeded comparison covers it.
JITTER = {"mixtral": dict(router_jitter_noise=0.1), "phimoe": dict(input_jitter_noise=0.1)}


def converted_pair(model_type: str, **overrides):
    reference = tiny_model(model_type, **overrides)
    return reference, moezoo.from_transformers(copy.deepcopy(reference))


def foreign_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted model's gradients under transformers' parameter names."""
    arch = ARCHITECTURES[model.config.model_type]
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads.update({n: torch.zeros_like(b) for n, b in model.named_buffers() if n.endswith("router.bias")})
    return transformers_layout(arch, zero_bias=model.config.model_type == "deepseek_v2").to_foreign(grads)


def test_every_required_architecture_is_supported():
    assert set(supported()) == set(TYPES)


@pytest.mark.parametrize("model_type", TYPES)
def test_logits_equal_after_conversion(model_type):
    reference, model = converted_pair(model_type)
    blocks = [m for m in reference.modules() if isinstance(m, ARCHITECTURES[model_type].block_class())]
    layers = [m for m in model.modules() if isinstance(m, TransformersMoE)]
    assert blocks and len(layers) == len(blocks)
    assert not any(isinstance(m, ARCHITECTURES[model_type].block_class()) for m in model.modules())
    x = tokens()
    with torch.no_grad():
        expected, actual = reference(x).logits, model(x).logits
    assert expected.abs().max() > 1.0  # logits far from zero: the comparison below is not vacuous
    assert (actual - expected).abs().max() <= 1e-5


def test_deepseek_v2_greedy_routing_and_deepseek_v3_without_renormalisation():
    for model_type, overrides in (("deepseek_v2", dict(topk_method="greedy")), ("deepseek_v3", dict(norm_topk_prob=False))):
        reference, model = converted_pair(model_type, **overrides)
        x = tokens()
        with torch.no_grad():
            assert (model(x).logits - reference(x).logits).abs().max() <= 1e-5, model_type
    router = next(m for m in converted_pair("deepseek_v2", topk_method="greedy")[1].modules() if isinstance(m, TransformersMoE)).router
    assert type(router) is TopKRouter and router.scale == 1.5 and not router.normalize
    with pytest.raises(ValueError, match="topk_method='noaux_tc' is not one"):
        converted_pair("deepseek_v2", topk_method="noaux_tc")


def test_the_routers_are_moezoo_routers_with_each_architectures_semantics():
    expected = {"mixtral": TopKRouter, "qwen2_moe": TopKRouter, "qwen3_moe": TopKRouter, "olmoe": TopKRouter,
                "deepseek_v3": GroupLimitedRouter, "deepseek_v2": GroupLimitedRouter, "phimoe": SparseMixerRouter}
    for model_type, router_class in expected.items():
        _, model = converted_pair(model_type)
        routers = [m.router for m in model.modules() if isinstance(m, TransformersMoE)]
        assert routers and all(type(r) is router_class for r in routers), model_type
    deepseek = next(m for m in converted_pair("deepseek_v3")[1].modules() if isinstance(m, TransformersMoE))
    assert (deepseek.router.num_groups, deepseek.router.topk_group, deepseek.router.group_top) == (4, 2, 2)
    assert deepseek.router.scale == 2.5 and deepseek.router.normalize and deepseek.shared is not None
    assert deepseek.router.bias.abs().sum() > 0  # e_score_correction_bias is the loss-free balancing bias


def test_conversion_keeps_the_model_object_and_is_idempotent():
    reference = tiny_model("mixtral")
    model = moezoo.from_transformers(reference)
    assert model is reference
    layers = [id(m) for m in model.modules() if isinstance(m, TransformersMoE)]
    assert moezoo.from_transformers(model) is model
    assert [id(m) for m in model.modules() if isinstance(m, TransformersMoE)] == layers


@pytest.mark.parametrize("model_type", TYPES)
def test_loss_and_gradients_equal_in_training(model_type):
    """The training loss, with the model's own auxiliary loss and coefficient added by moezoo's
    aux_loss (no output_router_logits), and every gradient, against transformers' loss with
    output_router_logits=True; jitter and SparseMixer's sampling seeded alike."""
    reference, model = converted_pair(model_type, **JITTER.get(model_type, {}))
    reference.train(), model.train()
    x = tokens()
    torch.manual_seed(5)
    expected = reference(x, labels=x, output_router_logits=True)
    expected.loss.backward()
    torch.manual_seed(5)
    out = model(x, labels=x)
    aux = aux_loss(model)
    (out.loss + aux).backward()
    torch.testing.assert_close(out.loss + aux, expected.loss, atol=1e-5, rtol=1e-6)
    if expected.aux_loss is None:  # DeepSeek: no auxiliary loss in transformers, none here
        assert aux == 0
    else:
        torch.testing.assert_close(aux, reference.config.router_aux_loss_coef * expected.aux_loss, atol=1e-7, rtol=1e-6)
    grads = foreign_grads(model)
    for name, p in reference.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    if model_type in JITTER:  # the training-mode randomness was really drawn: another seed, another loss
        torch.manual_seed(6)
        assert not torch.equal(model(x, labels=x).loss, out.loss)


def test_output_router_logits_are_supplied():
    for model_type in ("mixtral", "deepseek_v3", "phimoe"):
        reference, model = converted_pair(model_type)
        x = tokens()
        with torch.no_grad():
            expected = reference(x, output_router_logits=True)
            actual = model(x, output_router_logits=True)
        assert len(actual.router_logits) == len(expected.router_logits) > 0
        for a, e in zip(actual.router_logits, expected.router_logits):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
        if expected.aux_loss is not None:
            torch.testing.assert_close(actual.aux_loss, expected.aux_loss, atol=1e-6, rtol=1e-5)
        assert model(x).router_logits is None  # only when asked for


@pytest.mark.parametrize("model_type", [t if t in ("mixtral", "deepseek_v3", "phimoe") else pytest.param(t, marks=pytest.mark.slow)
                                        for t in TYPES])
def test_generate_with_the_kv_cache_gives_the_same_tokens(model_type):
    reference, model = converted_pair(model_type)
    prompt = tokens(batch=2, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    expected = reference.generate(prompt, **kwargs)
    actual = model.generate(prompt, **kwargs)
    assert expected.shape[1] > prompt.shape[1]
    assert torch.equal(actual, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = converted_pair("mixtral", router_jitter_noise=0.1)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    x = tokens()
    for m in (model, checkpointed):
        m.train()
        torch.manual_seed(3)
        (m(x, labels=x).loss + aux_loss(m)).backward()
    assert checkpointed.model.gradient_checkpointing
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-7, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


_LOAD_WITHOUT_MOEZOO = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    assert "moezoo" not in sys.modules
    jobs = json.loads(sys.argv[1])
    for folder, ids in jobs.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits
        torch.save(logits, folder + "/logits.pt")
    assert not any(name.startswith("moezoo") for name in sys.modules)
""")


def test_save_pretrained_round_trip_loads_in_plain_transformers(tmp_path):
    """Each converted model, trained one step (DeepSeek-V3 with loss-free balancing, so its biases
    move too), saved with save_pretrained; plain transformers in a fresh process without moezoo
    loads it and gives the converted model's logits."""
    x = tokens()
    jobs, expected = {}, {}
    for model_type in TYPES:
        model = moezoo.from_transformers(tiny_model(model_type), bias_update_rate=0.05 if model_type == "deepseek_v3" else 0.0)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(0)
        (model(x, labels=x).loss + aux_loss(model)).backward()
        update_routers(model)
        optimizer.step()
        model.eval()
        if model_type == "deepseek_v3":
            assert all(not torch.equal(b, torch.zeros_like(b)) for n, b in model.named_buffers() if n.endswith("router.bias"))
        folder = tmp_path / model_type
        model.save_pretrained(folder)
        with torch.no_grad():
            expected[model_type] = model(x).logits
        jobs[str(folder)] = x.tolist()
    result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_MOEZOO, json.dumps(jobs)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for model_type in TYPES:
        loaded = torch.load(tmp_path / model_type / "logits.pt")
        torch.testing.assert_close(loaded, expected[model_type], atol=1e-5, rtol=0, msg=model_type)


def test_saving_refuses_a_selection_bias_the_architecture_cannot_hold(tmp_path):
    _, model = converted_pair("deepseek_v2")
    router = next(m for m in model.modules() if isinstance(m, GroupLimitedRouter))
    router.bias.fill_(0.5)
    with pytest.raises(ValueError, match="router.bias is non-zero"):
        model.save_pretrained(tmp_path)


def test_unsupported_models_and_models_without_moe_blocks_are_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(model_type 'llama'\).*supported.*'deepseek_v3'"):
        moezoo.from_transformers(llama)
    with pytest.raises(ValueError, match="Linear.*supported model types"):
        moezoo.from_transformers(nn.Linear(2, 2))
    dense = tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(ValueError, match="Qwen2MoeForCausalLM has no Qwen2MoeSparseMoeBlock"):
        moezoo.from_transformers(dense)
    with pytest.raises(ValueError, match="bias_update_rate=0.1 needs a router with selection biases"):
        moezoo.from_transformers(tiny_model("mixtral"), bias_update_rate=0.1)


def test_every_aux_coefficient_is_the_configs():
    for model_type in TYPES:
        _, model = converted_pair(model_type)
        weights = [m.aux_loss_weights for m in model.modules() if isinstance(m, TransformersMoE)]
        coefficient = getattr(model.config, "router_aux_loss_coef", None)
        if model_type.startswith("deepseek"):
            assert all(w == {} for w in weights)
        else:
            assert all(w == {POOLED_LOAD_BALANCING: coefficient} for w in weights), model_type
