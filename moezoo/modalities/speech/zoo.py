"""Speech zoo entries: SpeechMoE on the built-in eSpeak data (shipped) and at the paper's scale."""

from __future__ import annotations

from moezoo.modalities.speech.model import SpeechMoE
from moezoo.zoo.registry import ShippedEvaluation, register_model, register_shipped

#: The tiny model of configs/speech/speechmoe_tiny_espeak.yaml.
SPEECHMOE_TINY_ESPEAK = dict(
    input_dim=40, vocab_size=29, dim=128, depth=4, hidden=256, num_experts=4, k=1, stack=3, memory_left=4,
    memory_right=2, embed_dim=64, embed_depth=2, embed_hidden=128, dropout=0.1,
)
#: Its dense baseline (configs/speech/speech_dense_tiny_espeak.yaml): no embedding network, no routers,
#: MLP width 302 so that its parameters equal SpeechMoE's active parameters per frame
#: (``matched_dense_hidden(**SPEECHMOE_TINY_ESPEAK)``).
SPEECH_DENSE_TINY_ESPEAK = {**SPEECHMOE_TINY_ESPEAK, "num_experts": None, "hidden": 302}

_INPUT_SPEC = {
    "sample_rate": 16000,
    "features": "Kaldi fbank (torchaudio.compliance.kaldi.fbank), 40 bins, 25 ms / 10 ms, dither 0, per-utterance CMVN",
    "input": "features (batch, frames, 40) and lengths (batch,)",
    "output": "CTC logits over 29 symbols: blank, space, apostrophe, a-z (moezoo.modalities.speech.CharTokenizer)",
}
_HELDOUT_VOICES = ShippedEvaluation(
    "moezoo.modalities.speech.evaluate:evaluate_espeak_heldout", task="automatic-speech-recognition", split="test",
    dataset_name="moezoo built-in eSpeak NG speech, held-out voices (seed 0)",
    datasets=("moezoo-espeak-speech",), card_metrics=("cer",))
_LIMITS = (
    "Demonstration scale. The speech is synthetic: eSpeak NG's 8 English accents x 104 voice variants, "
    "digit strings and command phrases over a 24-word vocabulary, white noise at 10-40 dB SNR. Test "
    "voices (15 variants) are never heard in training, but eSpeak variants share one synthesiser, so "
    "this says little about recorded human speech. 300 test utterances (3,048 characters). "
    "Weights ship in float16."
)

register_shipped(
    "speechmoe_tiny_espeak",
    SpeechMoE,
    modality="speech",
    input_spec=_INPUT_SPEC,
    description="SpeechMoE CTC model (4 MoE+FSMN blocks, 4 experts, top-1, routers on [shared embedding; layer "
                "input]) on the built-in eSpeak NG speech; trains on a CPU in minutes",
    evaluation=_HELDOUT_VOICES,
    tags=["mixture-of-experts", "speechmoe", "automatic-speech-recognition", "ctc"],
    architecture=(
        "Input: 40-dim Kaldi fbank, 3 frames stacked (30 ms output frames). Main network: linear "
        "projection to width 128, 4 pre-LN blocks, each an MoE layer of 4 ReLU expert MLPs (128 -> 256 "
        "-> 128) followed by an FSMN memory layer (4 past and 2 future taps), then a CTC head over 29 "
        "symbols. Shared embedding network: its own projection to 64, 2 dense MLP+FSMN blocks and a "
        "CTC head. Router of every MoE layer (`SpeechMoERouter`): softmax of a bias-free gate on "
        "[embedding (detached); layer input], top-1 expert, output scaled by its probability, no "
        "capacity. Losses: CTC + 0.01 x embedding CTC + sum over layers of 0.1 x sparsity L1 + "
        "0.1 x mean importance."
    ),
    limitations=_LIMITS,
    **SPEECHMOE_TINY_ESPEAK,
)

register_shipped(
    "speech_dense_tiny_espeak",
    SpeechMoE,
    modality="speech",
    input_spec=_INPUT_SPEC,
    description="Dense baseline of speechmoe_tiny_espeak with equal parameters per frame (MLP width 302, no "
                "routing, no embedding network)",
    evaluation=_HELDOUT_VOICES,
    tags=["automatic-speech-recognition", "ctc", "dense-baseline"],
    architecture=(
        "The speechmoe_tiny_espeak network without routing: 4 pre-LN blocks of a dense ReLU MLP (128 -> "
        "302 -> 128) and an FSMN memory layer, CTC head over 29 symbols, no embedding network. Width "
        "302 makes its parameters equal SpeechMoE's active parameters per frame (the embedding "
        "network, routers and one expert per layer)."
    ),
    limitations=_LIMITS,
    **SPEECH_DENSE_TINY_ESPEAK,
)

register_shipped(
    "speechmoe2_tiny_espeak",
    SpeechMoE,
    modality="speech",
    input_spec=_INPUT_SPEC,
    description="SpeechMoE2 router variant of speechmoe_tiny_espeak: domain and accent embeddings (auxiliary "
                "classifiers on the shared embedding) added to every router input",
    evaluation=_HELDOUT_VOICES,
    tags=["mixture-of-experts", "speechmoe2", "automatic-speech-recognition", "ctc"],
    architecture=(
        "speechmoe_tiny_espeak's network with SpeechMoE2's router input: two utterance-level embeddings "
        "of 16 dims, each tanh(Linear(mean and std over frames of the shared embedding)) with a "
        "classifier trained by cross-entropy (weight 0.1): the domain (digit strings / command phrases) "
        "and the accent (8 eSpeak English dialects). Every router sees [embedding; domain embedding; "
        "accent embedding; layer input] (all but the layer input detached)."
    ),
    limitations=_LIMITS,
    global_embeddings={"domain": 2, "accent": 8}, global_dim=16, **SPEECHMOE_TINY_ESPEAK,
)

#: A paper-scale configuration for GPU users (configs/speech/speechmoe_librispeech.yaml): 80-dim
#: fbank, 12 MoE+FSMN blocks of width 512, 8 experts of 2048, a 4-block embedding network. The
#: paper's own sizes (in-house Mandarin data) are not verified; these follow the authors' 3M-ASR recipe widths.
SPEECHMOE_LIBRISPEECH = dict(
    input_dim=80, vocab_size=29, dim=512, depth=12, hidden=2048, num_experts=8, k=1, stack=3, memory_left=10,
    memory_right=2, embed_dim=256, embed_depth=4, embed_hidden=1024, dropout=0.1,
)

#: The paper-scale entries' card text on the loss coefficients (see SPEECHMOE_LOSS_WEIGHTS).
_PAPER_LOSSES = (
    "No weights and no measurement. Loss coefficients: alpha (sparsity L1) = beta (mean importance) = 0.1 "
    "per MoE layer and gamma (embedding-network CTC) = 0.01. The SpeechMoE and SpeechMoE2 papers' values "
    "(arXiv 2105.03036, 2111.11831) were not found; 0.1 is the default of the authors' later 3M-ASR code "
    "(tencent-ailab/3m-asr, whose WenetSpeech Conformer recipe uses 0.15 each) and 0.01 that recipe's "
    "embed_scale. The papers' sizes (in-house Mandarin data) were not verified either."
)

register_model(
    "speechmoe_librispeech",
    SpeechMoE,
    modality="speech",
    description="SpeechMoE at a paper-like scale (12 blocks, width 512, 8 experts of 2048, top-1) for LibriSpeech "
                "characters; no weights",
    card={"limitations": _PAPER_LOSSES},
    **SPEECHMOE_LIBRISPEECH,
)

register_model(
    "speechmoe2_librispeech",
    SpeechMoE,
    modality="speech",
    description="SpeechMoE2 router variant of speechmoe_librispeech: a global embedding (speaker-group classes as "
                "a stand-in for accents) added to every router input; no weights",
    card={"limitations": _PAPER_LOSSES},
    global_embeddings={"accent": 8}, **SPEECHMOE_LIBRISPEECH,
)
