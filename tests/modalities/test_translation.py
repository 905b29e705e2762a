"""MoA's translation model: MoA in all three attentions, padding that changes nothing, greedy decoding, the
reference criterion (fairseq label smoothing, MoA losses added per token), BLEU, and the parallel data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moezoo.layers import MixtureOfAttentionHeads, routed_layers
from moezoo.modalities.text import MoATransformer, ParallelTextDataModule, Translation
from moezoo.modalities.text.parallel_data import dates_pairs
from moezoo.modalities.text.seq2seq import fairseq_sinusoidal_positions
from moezoo.modalities.text.translation import label_smoothed_nll_loss

PAD, BOS, EOS, VOCAB = 256, 257, 258, 259


def small_model(**kw) -> MoATransformer:
    torch.manual_seed(0)
    args = dict(vocab_size=VOCAB, dim=32, encoder_layers=2, decoder_layers=2, num_experts=4, k=2, head_dim=8,
                ffn_hidden=48, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, padding_idx=PAD)
    model = MoATransformer(**{**args, **kw})
    with torch.no_grad():  # the zero-initialised MoA gates would tie every top-k
        for _, layer in routed_layers(model):
            layer.router.gate.weight.normal_()
    return model.eval()


def test_moa_in_encoder_self_decoder_self_and_cross_attention():
    model = small_model()
    layers = [m for _, m in routed_layers(model)]
    assert len(layers) == 2 + 2 * 2 and all(isinstance(m, MixtureOfAttentionHeads) for m in layers)
    assert all(isinstance(layer.cross_attn.fn, MixtureOfAttentionHeads) for layer in model.decoder)


def test_padding_changes_nothing_for_the_real_tokens():
    model = small_model()
    source, target = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 5))
    alone = model(source, target)
    padded_source = torch.cat([source, torch.full((1, 3), PAD)], 1)
    padded_target = torch.cat([target, torch.full((1, 2), PAD)], 1)
    batch = model(torch.cat([padded_source, torch.randint(0, 256, (1, 10))]),
                  torch.cat([padded_target, torch.randint(0, 256, (1, 7))]))
    torch.testing.assert_close(batch[:1, :5], alone, atol=1e-5, rtol=1e-5)
    # Padded queries route nowhere in every MoA layer: the decoder's padded positions attend to nothing.
    enc_attn = model.encoder[0].self_attn.fn
    assert int(enc_attn.last_stats["tokens_per_expert"].sum()) == (7 + 10) * 2


def test_decoder_is_causal_and_generation_is_greedy_to_the_end_of_sentence():
    model = small_model()
    source, target = torch.randint(0, 256, (2, 6)), torch.randint(0, 256, (2, 5))
    changed = target.clone()
    changed[:, 3:] = (changed[:, 3:] + 1) % 256
    torch.testing.assert_close(model(source, target)[:, :3], model(source, changed)[:, :3])
    out = model.generate(source, BOS, EOS, max_length=4)
    prefix = torch.full((2, 1), BOS)
    for step in range(out.shape[1]):
        expected = model(source, prefix)[:, -1].argmax(-1)
        assert torch.equal(out[:, step], expected)
        prefix = torch.cat([prefix, expected[:, None]], 1)


def test_fairseq_positions_skip_padding():
    tokens = torch.tensor([[5, 6, PAD], [7, PAD, PAD]])
    pos = fairseq_sinusoidal_positions(tokens, 8, PAD)
    assert torch.count_nonzero(pos[0, 2]) == 0 and torch.count_nonzero(pos[1, 1:]) == 0
    # The first real token sits at padding_idx + 1; channels are [sin | cos] of 10000^(-i / 3).
    p = PAD + 1
    expected = [math.sin(p * 10000 ** (-i / 3)) for i in range(4)] + [math.cos(p * 10000 ** (-i / 3)) for i in range(4)]
    torch.testing.assert_close(pos[1, 0], torch.tensor(expected), atol=1e-4, rtol=1e-4)


def test_label_smoothing_is_fairseqs():
    logits, target = torch.randn(3, 4, 11), torch.randint(0, 10, (3, 4))
    target[0, 3] = 10  # padding
    loss, nll = label_smoothed_nll_loss(logits, target, 0.1, ignore_index=10)
    lp = torch.log_softmax(logits, -1)
    keep = target != 10
    nll_ref = -lp.gather(-1, target[..., None])[..., 0][keep].sum()
    eps_i = 0.1 / 10
    torch.testing.assert_close(nll, nll_ref)
    torch.testing.assert_close(loss, (1 - 0.1 - eps_i) * nll_ref + eps_i * -lp.sum(-1)[keep].sum())


def test_moa_losses_are_added_to_the_token_summed_loss():
    model = small_model().train()
    task = Translation(model)
    task.log = lambda *a, **k: None
    model(torch.randint(0, 256, (2, 6)), torch.randint(0, 256, (2, 5)))
    main = torch.tensor(2.0)
    aux = sum(0.01 * m.last_losses["load_balancing"] + 0.001 * m.last_losses["z_loss"] for _, m in routed_layers(model))
    torch.testing.assert_close(task.add_aux_loss(main, "train", 40), main + aux / 40)


class _Data:
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    @staticmethod
    def decode(ids):
        kept = []
        for i in ids:
            if i == EOS:
                break
            if i < 256:
                kept.append(i)
        return bytes(kept).decode("utf-8", "replace")


def test_validation_logs_loss_perplexity_and_bleu_of_greedy_translations(monkeypatch):
    model = small_model()
    task = Translation(model)
    monkeypatch.setattr(Translation, "_datamodule", lambda self: _Data())
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    # A "model" that always translates into the reference: BLEU 100.
    reference = "from July 2, 1999 to May 9, 2001"
    ids = torch.tensor([list(reference.encode()) + [EOS]])
    monkeypatch.setattr(model, "generate", lambda source, bos, eos, limit: ids.expand(source.shape[0], -1))
    batch = {"source": torch.randint(0, 256, (2, 5)), "target_in": torch.randint(0, 256, (2, 4)),
             "target_out": torch.randint(0, 256, (2, 4)), "references": [reference, reference]}
    loss, tokens = task.step(batch, "val")
    assert tokens == 8 and logged["val/loss"] == pytest.approx(float(loss))
    task.on_validation_epoch_end()
    assert logged["val/bleu"] == pytest.approx(100.0)
    assert logged["val/ppl"] == pytest.approx(math.exp(logged["val/nll"]), rel=1e-5)


def test_test_stage_bleu_is_corpus_bleu_by_hand(monkeypatch):
    model = small_model()
    task = Translation(model)
    monkeypatch.setattr(Translation, "_datamodule", lambda self: _Data())
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    # One wrong last word of six, same length (brevity penalty 1): the n-gram precisions are
    # 5/6, 4/5, 3/4, 2/3, so BLEU = 100 * (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = 100 * 3 ** -0.25.
    reference, hypothesis = "a b c d e f", "a b c d e g"
    ids = torch.tensor([list(hypothesis.encode()) + [EOS]])
    monkeypatch.setattr(model, "generate", lambda source, bos, eos, limit: ids.expand(source.shape[0], -1))
    batch = {"source": torch.randint(0, 256, (1, 5)), "target_in": torch.randint(0, 256, (1, 4)),
             "target_out": torch.randint(0, 256, (1, 4)), "references": [reference]}
    task.step(batch, "test")
    task.on_test_epoch_end()
    assert logged["test/bleu"] == pytest.approx(100 * 3 ** -0.25, rel=1e-6)
    assert "val/bleu" not in logged and task.hypotheses == [] and task.references == []


def test_built_in_dates_corpus_is_deterministic_disjoint_and_a_translation():
    a, b = dates_pairs(), dates_pairs()
    assert a == b and [len(a[s]) for s in ("train", "val", "test")] == [20000, 300, 300]
    train = {s for s, _ in a["train"]}
    assert not train & {s for s, _ in a["val"]} and not train & {s for s, _ in a["test"]}
    source, target = next((s, t) for s, t in a["train"] if "/" in s)
    d1, m1, y1 = source.split()[1].split("/")
    assert target.startswith(f"from {['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August', 'September', 'October', 'November', 'December'][int(m1) - 1]} {int(d1)}, {y1} to ")


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_user_parallel_text_files(tmp_path, kind):
    pairs = [("guten Morgen", "good morning"), ("danke schön", "thank you")]
    for split in ("train", "val"):
        path = tmp_path / f"{split}.{kind}"
        if kind == "tsv":
            path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
        else:
            path.write_text("".join(json.dumps({"de": s, "en": t}) + "\n" for s, t in pairs), encoding="utf-8")
    dm = ParallelTextDataModule(kind, batch_size=2, train_file=str(tmp_path / f"train.{kind}"),
                                val_file=str(tmp_path / f"val.{kind}"), source_field="de", target_field="en")
    batch = next(iter(dm.val_dataloader()))
    assert batch["references"] == ["good morning", "thank you"]
    assert dm.decode(batch["target_out"][1].tolist()) == "thank you"
    assert batch["target_in"][0, 0] == dm.bos_id and batch["target_out"][0, len("good morning")] == dm.eos_id
    assert batch["source"][1, len("danke schön".encode()):].eq(dm.pad_id).all()
    with pytest.raises(ValueError, match="needs train_file and val_file"):
        ParallelTextDataModule(kind)


def test_translation_model_trains_on_the_built_in_pairs():
    torch.manual_seed(0)
    dm = ParallelTextDataModule(batch_size=16)
    dm.setup()
    model = MoATransformer(dm.vocab_size, 32, 1, 1, num_experts=4, k=2, head_dim=8, ffn_hidden=64, dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0, padding_idx=dm.pad_id).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _, batch in zip(range(30), dm.train_dataloader()):
        logits = model(batch["source"], batch["target_in"])
        loss = F.cross_entropy(logits.reshape(-1, dm.vocab_size), batch["target_out"].reshape(-1), ignore_index=dm.pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
