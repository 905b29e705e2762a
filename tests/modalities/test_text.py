"""Text modality: the built-in corpus and other sources, the LM with every attention/MLP kind, the task's
metrics, a 2-step CLI fit of the tiny configs and the shipped entries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import moezoo
from moezoo.layers import MoE, aux_loss, routed_layers
from moezoo.layers.moa import MixtureOfAttentionHeads
from moezoo.layers.switchhead import SwitchHeadAttention
from moezoo.modalities.text import LanguageModeling, TextDataModule, TransformerLM, lm_loss, load_tokenizer
from moezoo.modalities.text.evaluate import evaluate_lm, forward_macs
from tests.cli_fit import assert_two_warmup_steps, train_losses, two_step_fit

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(vocab_size=256, dim=32, depth=2, context_length=16)


def test_builtin_corpus_split_is_fixed_and_byte_level():
    a, b = TextDataModule(context_length=64, batch_size=4), TextDataModule(context_length=64, batch_size=4)
    a.setup(), b.setup()
    assert torch.equal(a.ids["val"], b.ids["val"]) and a.vocab_size == 256
    from pydoc_data.topics import topics

    names = sorted(topics)
    val_text = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 10 == 3)
    assert a.ids["val"].tolist() == list(val_text.encode("utf-8"))
    assert a.bytes_per_token("val") == 1.0
    batch = next(iter(a.val_dataloader()))
    assert batch.shape == (4, 65) and batch.dtype == torch.int64
    assert torch.equal(batch[0], a.ids["val"][:65].long())  # evaluation windows are consecutive
    train = set(a.ids["train"][:2000].tolist())
    assert len(train) > 30


def test_text_files_and_a_transformers_tokenizer(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("hello world, " * 40)
    val.write_text("héllo again " * 10)
    dm = TextDataModule("files", "byt5", context_length=8, batch_size=2, train_files=[str(train)], val_files=[str(val)])
    dm.setup()
    encode, vocab = load_tokenizer("byt5")
    assert vocab == dm.vocab_size > 256
    assert dm.ids["val"].tolist() == encode(val.read_text())
    # bytes per token from the split itself: 'é' is two UTF-8 bytes, one ByT5 token per byte
    assert dm.bytes_per_token("val") == pytest.approx(len(val.read_text().encode()) / dm.ids["val"].numel())
    held_out = TextDataModule("files", context_length=8, train_files=[str(train)], val_fraction=0.25)
    held_out.setup()
    assert held_out.ids["val"].numel() == len(train.read_text()) - int(len(train.read_text()) * 0.75)


def test_datasets_corpus_saved_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    corpus = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a first document " * 5, "a second one " * 5]}),
        "validation": datasets.Dataset.from_dict({"text": ["held out text " * 4]}),
    })
    corpus.save_to_disk(str(tmp_path / "corpus"))
    dm = TextDataModule(f"hf:{tmp_path / 'corpus'}", context_length=8, batch_size=2, max_documents=1)
    dm.setup()
    assert bytes(dm.ids["train"].tolist()).decode() == "a first document " * 5
    assert bytes(dm.ids["val"].tolist()).decode() == "held out text " * 4


@pytest.mark.parametrize(
    "attention, mlp, attention_type, mlp_type, maps",
    [
        ("dense", "dense", torch.nn.Module, torch.nn.Module, 2 * 4),
        ("moa", "moe", MixtureOfAttentionHeads, MoE, 2 * 2),
        ("switchhead", "sigma_moe", SwitchHeadAttention, MoE, 2 * 2),
    ],
)
def test_lm_kinds_are_causal_and_count_attention_maps(attention, mlp, attention_type, mlp_type, maps):
    torch.manual_seed(0)
    heads = 4 if attention == "dense" else 2
    model = TransformerLM(**SMALL, attention=attention, mlp=mlp, num_heads=heads, head_dim=8, attention_experts=4,
                          attention_k=2, mlp_hidden=16, mlp_experts=4, mlp_k=2).eval()
    assert isinstance(model.blocks[0].attn, attention_type) and isinstance(model.blocks[0].mlp, mlp_type)
    assert model.attention_matrices() == maps
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    a, b = model(tokens), model(changed)
    assert a.shape == (2, 12, 256)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    # MoA and SwitchHead attention layers are routed layers too (2 blocks).
    assert len(routed_layers(model)) == (0 if mlp == "dense" else 2) + (0 if attention == "dense" else 2)


@pytest.mark.parametrize("attention, mlp", [("moa", "moe"), ("switchhead", "sigma_moe")])
def test_aux_loss_weights_reach_every_routed_layer(attention, mlp):
    weights = {"entropy_reg": 0.5, "load_balancing": 0.2}
    model = TransformerLM(**SMALL, attention=attention, mlp=mlp, num_heads=2, head_dim=8, attention_experts=4,
                          attention_k=2, mlp_hidden=16, mlp_experts=4, mlp_k=2, aux_loss_weights=weights)
    layers = routed_layers(model)
    assert len(layers) == 4 and all(layer.aux_loss_weights == weights for _, layer in layers)


def test_routed_attention_layers_add_their_losses():
    model = TransformerLM(**SMALL, attention="moa", attention_experts=4, attention_k=2, head_dim=8).train()
    loss, tokens = lm_loss(model, torch.randint(0, 256, (2, 17)))
    assert tokens == 32 and loss.item() == pytest.approx(math.log(256), rel=0.1)
    layers = [m for _, m in routed_layers(model)]
    assert len(layers) == 2 and all(isinstance(m, MixtureOfAttentionHeads) for m in layers)
    expected = sum(0.01 * m.last_losses["load_balancing"] + 0.001 * m.last_losses["z_loss"] for m in layers)
    torch.testing.assert_close(aux_loss(model), expected)


def test_evaluation_metrics_and_macs():
    torch.manual_seed(1)
    model = TransformerLM(**SMALL)
    dm = TextDataModule(context_length=16, eval_batch_size=64)
    dm.setup()
    dm.ids["val"] = dm.ids["val"][:16 * 17 + 5]  # 16 windows
    dm.bytes["val"] = dm.ids["val"].numel()
    result = evaluate_lm(model, dm, "val")
    assert result["tokens"] == 16 * 16
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    # A dense 2-block model: per token 2 x (qkv 3*32*32 + out 32*32 + MLP 2*32*512) + head 32*256
    macs = forward_macs(model, torch.zeros(1, 16, dtype=torch.long))
    per_token = 2 * (4 * 32 * 32 + 2 * 32 * 512) + 32 * 256
    attention = 2 * 2 * 16 * 16 * 8 * 4  # scores and weighted values, 4 heads of 8, 2 blocks
    assert macs == 16 * per_token + attention


def test_task_logs_perplexity_and_bits_per_byte():
    task = LanguageModeling(TransformerLM(**SMALL), bytes_per_token=2.0)
    task.nll["val_"].update(torch.tensor(1.5), weight=10)
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    task.on_validation_epoch_end()
    assert logged["val/ppl"] == pytest.approx(math.exp(1.5))
    assert logged["val/bpb"] == pytest.approx(1.5 / math.log(2) / 2.0)


@pytest.mark.parametrize("config", ["lm_moa_pydoc", "lm_switchhead_pydoc", "lm_sigma_moe_pydoc"])
def test_two_step_cli_fit(config, tmp_path):
    checkpoint, rows = two_step_fit(f"text/{config}", tmp_path, "--data.init_args.batch_size", "2")
    assert_two_warmup_steps(checkpoint, lr=0.002, warmup_steps=50)  # the configs' lr and warmup_steps
    # An untrained byte-level LM predicts nearly uniformly over 256 bytes: a first loss near ln 256.
    first, _ = train_losses(rows)
    assert abs(first - math.log(256)) < 0.5
    (val,) = [row for row in rows if "val/loss" in row]  # one validation batch of byte windows
    assert val["val/ppl"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-5)
    assert val["val/bpb"] == pytest.approx(val["val/loss"] / math.log(2), rel=1e-5)  # 1 byte per token


def _pydoc_validation_windows(length: int = 129) -> torch.Tensor:
    """The cards' validation split built from CPython's pydoc_data.topics directly: topics sorted by
    name, every 10th from the 4th, joined by a blank line, UTF-8 bytes cut into consecutive windows of
    ``length`` (the model reads length - 1 bytes and predicts the next byte at each)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    text = "\n\n".join(topics[n] for i, n in enumerate(names) if i % 10 == 3)
    ids = torch.tensor(list(text.encode("utf-8")))
    count = ids.numel() // length
    return ids[: count * length].view(count, length)


@pytest.mark.parametrize("name", moezoo.list_models("lm_*_pydoc", pretrained=True))
def test_shipped_entries_reproduce_their_cards(name):
    """The recorded loss, perplexity and bits per byte, recomputed by a plain loop over the logits (float64
    log-softmax of the true next byte), without moezoo's data module, lm_loss or evaluator."""
    record = json.loads((ROOT / "model_cards" / "results" / f"{name}.json").read_text())["metrics"]
    model = moezoo.create_model(name, pretrained=True).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in _pydoc_validation_windows().split(16):
            log_probs = torch.log_softmax(model(batch[:, :-1]).double(), dim=-1)
            nll -= float(log_probs.gather(-1, batch[:, 1:, None]).sum())
            tokens += batch[:, 1:].numel()
    assert record["tokens"] == tokens
    assert record["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert record["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert record["bits_per_byte"] == pytest.approx(nll / tokens / math.log(2), rel=1e-5)
