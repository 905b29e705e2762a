"""SpeechMoE: router inputs, losses in the model, CTC decoding, CER, features, the eSpeak render, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moezoo.layers import aux_loss, parameter_counts
from moezoo.modalities.speech import (
    KEYWORDS,
    CharTokenizer,
    FSMNMemory,
    SpecAugment,
    SpeechDataModule,
    SpeechFeatures,
    SpeechMoE,
    character_error_rate,
    edit_distance,
    generate_transcripts,
    greedy_ctc_decode,
    matched_dense_hidden,
    normalize_utterance,
)
from moezoo.modalities.speech.data import RenderSettings, _voice_split, render_espeak_split
from moezoo.modalities.speech.espeak import voice_variants
from moezoo.modalities.speech.model import stack_frames
from moezoo.routers.losses import mean_importance_loss, sparsity_l1_loss
from tests.cli_fit import assert_two_warmup_steps, train_losses, two_step_fit

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(input_dim=8, vocab_size=29, dim=16, depth=2, hidden=24, num_experts=4, stack=2, embed_dim=6,
            embed_depth=1, embed_hidden=12, dropout=0.0)


def _batch():
    torch.manual_seed(0)
    return torch.randn(3, 20, 8), torch.tensor([20, 13, 5])


def _capture(model):
    """Record the embedding network's output and each router's and each MoE layer's input."""
    seen = {"router": [], "ffn_in": []}
    model.embedding.register_forward_hook(lambda m, args, out: seen.update(embedding=out[0]))
    for name, module in model.global_embeddings.items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: out[0]}))
    for block in model.blocks:
        block.ffn.router.register_forward_hook(lambda m, args, out: seen["router"].append(args[0]))
        block.norm_ffn.register_forward_hook(lambda m, args, out: seen["ffn_in"].append(out))
    return seen


def test_router_inputs_are_the_shared_embedding_and_the_layer_input():
    model = SpeechMoE(**TINY).eval()
    seen = _capture(model)
    features, lengths = _batch()
    out = model(features, lengths)
    mask = torch.arange(10).unsqueeze(0) < out.lengths.unsqueeze(1)
    assert out.lengths.tolist() == [10, 7, 3]
    for routed, layer_in in zip(seen["router"], seen["ffn_in"]):
        assert routed.shape == (int(mask.sum()), 6 + 16)  # padding frames are not routed
        assert torch.equal(routed[:, :6], seen["embedding"][mask])
        assert torch.equal(routed[:, 6:], layer_in[mask])


def test_speechmoe2_router_inputs_add_the_global_embeddings():
    model = SpeechMoE(**TINY, global_embeddings={"domain": 2, "accent": 3}, global_dim=4).eval()
    seen = _capture(model)
    features, lengths = _batch()
    out = model(features, lengths)
    assert set(out.global_logits) == {"domain", "accent"} and out.global_logits["accent"].shape == (3, 3)
    mask = torch.arange(10).unsqueeze(0) < out.lengths.unsqueeze(1)
    utterance = torch.arange(3).unsqueeze(1).expand(3, 10)[mask]
    for routed in seen["router"]:
        assert routed.shape[1] == 6 + 4 + 4 + 16
        assert torch.equal(routed[:, :6], seen["embedding"][mask])
        assert torch.equal(routed[:, 6:10], seen["domain"][utterance])
        assert torch.equal(routed[:, 10:14], seen["accent"][utterance])


def test_embedding_is_detached_before_the_routers():
    features, lengths = _batch()
    for detach in (True, False):
        torch.manual_seed(0)
        model = SpeechMoE(**TINY, detach_embedding=detach)
        model(features, lengths)
        aux_loss(model).backward()
        grad = model.embedding.proj.weight.grad
        assert (grad is None or grad.abs().sum() == 0) == detach


def test_model_losses_follow_the_paper_formulas_with_its_coefficients():
    model = SpeechMoE(**TINY).train()
    logits = []
    for layer in model.moe_layers():
        layer.router.register_forward_hook(lambda m, args, out: logits.append(args[0] @ m.gate.weight.t()))
    model(*_batch())
    expected = 0.0
    for layer, layer_logits in zip(model.moe_layers(), logits):
        probs = torch.softmax(layer_logits, dim=-1)
        l_s, l_m = sparsity_l1_loss(probs).item(), mean_importance_loss(probs).item()
        assert layer.last_losses["sparsity_l1"].item() == pytest.approx(l_s, rel=1e-5)
        assert layer.last_losses["mean_importance"].item() == pytest.approx(l_m, rel=1e-5)
        expected += 0.1 * l_s + 0.1 * l_m  # alpha = beta = 0.1, summed over layers
    assert len(logits) == 2 and aux_loss(model).item() == pytest.approx(expected, rel=1e-5)


def test_dense_baseline_has_the_moe_models_active_parameters():
    hidden = matched_dense_hidden(**TINY)
    active = parameter_counts(SpeechMoE(**TINY))["active"]
    dense = SpeechMoE(**{**TINY, "num_experts": None, "hidden": hidden})
    assert dense.embedding is None and not dense.moe_layers()
    assert abs(parameter_counts(dense)["total"] - active) <= 2 * TINY["dim"] + 1  # within one hidden unit
    # The shipped tiny pair too (configs/speech/*_tiny_espeak.yaml use these arguments).
    from moezoo.modalities.speech.zoo import SPEECH_DENSE_TINY_ESPEAK, SPEECHMOE_TINY_ESPEAK

    assert SPEECH_DENSE_TINY_ESPEAK["hidden"] == matched_dense_hidden(**SPEECHMOE_TINY_ESPEAK)


def test_keyword_head_and_stacking_shapes():
    model = SpeechMoE(**TINY, num_keywords=len(KEYWORDS))
    features, lengths = _batch()
    out = model(features, lengths)
    assert out.logits.shape == (3, 10, 29) and out.embed_logits.shape == (3, 10, 29)
    assert out.keyword_logits.shape == (3, 20)
    stacked, new = stack_frames(torch.arange(14.0).reshape(1, 7, 2), torch.tensor([7]), 3)
    assert stacked.shape == (1, 3, 6) and new.tolist() == [3]
    assert stacked[0, 1].tolist() == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0] and stacked[0, 2, 2:].sum() == 0


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # the step runs outside a Trainer
def test_objective_adds_embedding_ctc_keyword_and_global_losses_with_their_weights():
    import torch.nn.functional as F

    from moezoo.modalities.speech import SpeechRecognition

    torch.manual_seed(5)
    model = SpeechMoE(**TINY, num_keywords=3, global_embeddings={"accent": 2}).eval()
    task = SpeechRecognition(model, embedding_ctc_weight=0.01, keyword_weight=0.5, global_weight=0.2)
    features, lengths = _batch()
    targets = torch.tensor([[3, 4, 5], [6, 7, 0], [8, 0, 0]])
    target_lengths = torch.tensor([3, 2, 1])
    batch = {"features": features, "lengths": lengths, "targets": targets, "target_lengths": target_lengths,
             "keyword": torch.tensor([2, -1, 0]), "accent": torch.tensor([1, 0, -1]), "domain": torch.tensor([-1] * 3),
             "text": ["abc", "de", "f"]}
    loss, batch_size = task.step(batch, "val")
    assert batch_size == 3
    out = model(features, lengths)

    def ctc(logits):  # summed over utterances, divided by the batch size
        log_probs = F.log_softmax(logits, -1).transpose(0, 1)
        return F.ctc_loss(log_probs, targets, out.lengths, target_lengths, reduction="sum") / 3

    expected = (ctc(out.logits) + 0.01 * ctc(out.embed_logits)
                + 0.5 * F.cross_entropy(out.keyword_logits[[0, 2]], torch.tensor([2, 0]))
                + 0.2 * F.cross_entropy(out.global_logits["accent"][[0, 1]], torch.tensor([1, 0])))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="keyword head"):
        SpeechRecognition(SpeechMoE(**TINY), keyword_weight=1.0)


def test_fsmn_memory_against_a_naive_loop():
    torch.manual_seed(3)
    memory = FSMNMemory(4, left=2, right=1, stride=2)
    h = torch.randn(2, 9, 4)
    mask = torch.arange(9).unsqueeze(0) < torch.tensor([[9], [6]])
    taps = memory.filter.weight[:, 0]  # (dim, left + right + 1): taps t - 2s, t - s, t, t + s
    hm = h * mask.unsqueeze(-1)
    expected = torch.zeros_like(h)
    for b in range(2):
        for t in range(9):
            for i, offset in enumerate((-4, -2, 0, 2)):
                if 0 <= t + offset < 9:
                    expected[b, t] += taps[:, i] * hm[b, t + offset]
    assert torch.allclose(memory(h, mask), expected, atol=1e-6)


def test_greedy_ctc_decode_of_a_hand_made_posterior():
    # symbols: 0 blank, 1 'a', 2 'b'. Best path a a _ a b b _ b | (padding) -> "a a b b" collapsed.
    path = [1, 1, 0, 1, 2, 2, 0, 2, 1, 1]
    posterior = torch.full((2, 10, 3), 0.1)
    posterior[0, torch.arange(10), torch.tensor(path)] = 0.8
    posterior[1, :, 0] = 0.8  # all blank
    assert greedy_ctc_decode(posterior, torch.tensor([8, 10])) == [[1, 1, 2, 2], []]
    assert greedy_ctc_decode(posterior[:1], torch.tensor([10])) == [[1, 1, 2, 2, 1]]


def test_edit_distance_and_cer_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert character_error_rate(["one two", "go"], ["one to", "no"]) == pytest.approx(2 / 9)
    tok = CharTokenizer()
    assert len(tok) == 29 and tok.decode(tok.encode("Don't  STOP!")) == "don't stop"


def test_feature_shapes_normalisation_and_specaugment():
    torch.manual_seed(0)
    wave = torch.randn(16000) * 0.1
    for kind in ("fbank", "mel"):
        feats = SpeechFeatures(kind, 40)(wave)
        assert feats.shape == (1 + (16000 - 400) // 160, 40) == (SpeechFeatures(kind, 40).num_frames(16000), 40)
        assert feats.mean(0).abs().max() < 1e-4 and (feats.std(0, unbiased=False) - 1).abs().max() < 1e-3
    raw = SpeechFeatures("fbank", 80, normalize=False)(wave)
    assert raw.shape == (98, 80) and torch.allclose(normalize_utterance(raw), SpeechFeatures("fbank", 80)(wave))
    masked = SpecAugment(freq_masks=1, freq_width=10, time_masks=1, time_width=20)(feats + 5.0)
    assert masked.shape == feats.shape and (masked == 0).any() and ((masked == 0) | (masked == feats + 5.0)).all()
    with pytest.raises(ValueError, match="kind"):
        SpeechFeatures("mfcc")


def test_transcripts_and_voice_split():
    rng = np.random.default_rng(0)
    words = generate_transcripts(50, "keywords", rng)
    assert all(KEYWORDS[u.keyword] == u.text for u in words)
    mixed = generate_transcripts(50, "mixed", rng)
    assert {u.domain for u in mixed} == {0, 1} and all(1 <= len(u.text.split()) <= 4 for u in mixed)
    variants = [f"v{i}" for i in range(104)]
    split = _voice_split(variants, seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [73, 16, 15]
    train, val, test = (set(split[s]) for s in ("train", "val", "test"))
    assert not train & (val | test) and not val & test


def test_espeak_render_is_deterministic_for_a_seed():
    pytest.importorskip("espeakng_loader")
    settings = RenderSettings(seed=3)
    audio, offsets, utts = render_espeak_split(settings, "test", count=6)
    again, offsets2, utts2 = render_espeak_split(settings, "test", count=6, workers=1)
    assert np.array_equal(audio, again) and np.array_equal(offsets, offsets2) and utts == utts2
    assert audio.dtype == np.int16 and len(offsets) == 7 and np.all(np.diff(offsets) > 8000)  # > 0.5 s each
    other, _, _ = render_espeak_split(RenderSettings(seed=4), "test", count=6)
    assert not np.array_equal(other, audio)
    assert {u.speaker.split("+", 1)[1] for u in utts} <= set(_voice_split(voice_variants(), 3)["test"])


def test_folder_dataset_reads_audio_and_transcripts(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        lines = []
        for i, text in enumerate(["yes", "go left"]):
            wave = (np.random.default_rng(i).standard_normal(8000 * (i + 1)) * 0.1).astype(np.float32)
            soundfile.write(tmp_path / split / f"{i}.wav", wave, 8000)
            lines.append(f"{i}.wav\t{text}")
        (tmp_path / split / "transcripts.tsv").write_text("\n".join(lines) + "\n")
    data = SpeechDataModule("folder", root=str(tmp_path), batch_size=2, spec_augment=False)
    batch = next(iter(data.val_dataloader()))
    assert batch["features"].shape == (2, 198, 40)  # resampled to 16 kHz: 2 s -> 198 frames
    assert batch["lengths"].tolist() == [98, 198] and batch["target_lengths"].tolist() == [3, 7]
    assert batch["text"] == ["yes", "go left"]


def _write_wave(path: Path, seconds: float, rate: int = 16000) -> None:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    wave = (np.random.default_rng(len(str(path))).standard_normal(int(seconds * rate)) * 0.1).astype(np.float32)
    soundfile.write(path, wave, rate)


def test_librispeech_and_speechcommands_layouts_on_disk(tmp_path):
    pytest.importorskip("soundfile")
    for subset in ("train-clean-100", "dev-clean", "test-clean"):
        chapter = tmp_path / "LibriSpeech" / subset / "19" / "198"
        _write_wave(chapter / "19-198-0001.flac", 1.0)
        (chapter / "19-198.trans.txt").write_text("19-198-0001 NORTHANGER ABBEY\n")
    data = SpeechDataModule("librispeech", root=str(tmp_path), batch_size=1, spec_augment=False)
    batch = next(iter(data.test_dataloader()))
    assert batch["text"] == ["NORTHANGER ABBEY"] and batch["features"].shape == (1, 98, 40)

    words = tmp_path / "SpeechCommands" / "speech_commands_v0.02"
    for word, speaker in (("go", "aa"), ("yes", "bb"), ("go", "cc")):
        _write_wave(words / word / f"{speaker}_nohash_0.wav", 0.5)
    (words / "validation_list.txt").write_text("yes/bb_nohash_0.wav\n")
    (words / "testing_list.txt").write_text("go/cc_nohash_0.wav\n")
    commands = SpeechDataModule("speechcommands", root=str(tmp_path), batch_size=1, spec_augment=False)
    batch = next(iter(commands.test_dataloader()))
    assert commands.keywords == ("go",) and batch["text"] == ["go"] and batch["keyword"].tolist() == [0]
    with pytest.raises(FileNotFoundError, match="never downloads"):
        SpeechDataModule("librispeech", root=str(tmp_path / "nothing")).setup()


SPEECH_FAST = ["--data.init_args.num_train", "64", "--data.init_args.num_val", "16", "--data.init_args.num_test", "16",
               "--data.init_args.batch_size", "8"]


# What SpeechMoE2's objective adds to CTC + 0.01 * embedding CTC at the start: global_weight 0.1 times
# the cross-entropies of its untrained, nearly uniform domain (2 classes) and accent (8 classes)
# classifiers, ln 2 + ln 8; SpeechMoE has no global classifiers.
@pytest.mark.parametrize("config, global_terms, tolerance", [
    ("speechmoe_tiny_espeak", 0.0, 1e-3),
    ("speechmoe2_tiny_espeak", 0.1 * math.log(16), 0.06),  # 8 utterances a batch: not exactly uniform
])
def test_two_step_cli_fit(config, global_terms, tolerance, tmp_path):
    pytest.importorskip("espeakng_loader")
    checkpoint, rows = two_step_fit(f"speech/{config}", tmp_path, "--data.init_args.cache_dir", str(tmp_path / "cache"),
                                    *SPEECH_FAST)
    assert_two_warmup_steps(checkpoint, lr=0.002, warmup_steps=100)  # the configs' lr and warmup_steps
    losses = [train_losses(rows, f"train/{key}_step") for key in ("loss", "ctc", "embedding_ctc")]
    assert len(losses[0]) == 2
    for total, ctc, embedding_ctc in zip(*losses):
        # the configs' weights: ctc_weight 1.0, embedding_ctc_weight 0.01
        assert total - (ctc + 0.01 * embedding_ctc) == pytest.approx(global_terms, abs=tolerance)
    assert len(list((tmp_path / "cache").glob("espeak-*/train/audio.npy"))) == 1  # rendered once, cached
