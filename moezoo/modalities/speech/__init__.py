"""Speech: SpeechMoE / SpeechMoE2 CTC acoustic models, torchaudio features, eSpeak NG speech data."""

from moezoo.modalities.speech.data import (
    COMMANDS,
    DIGITS,
    KEYWORDS,
    CharTokenizer,
    SpeechDataModule,
    SpeechDataset,
    Utterance,
    collate_speech,
    generate_transcripts,
    render_espeak_split,
)
from moezoo.modalities.speech.evaluate import (
    character_error_rate,
    edit_distance,
    evaluate_speech,
    greedy_ctc_decode,
)
from moezoo.modalities.speech.features import SpecAugment, SpeechFeatures, normalize_utterance
from moezoo.modalities.speech.model import (
    FSMNMemory,
    GlobalEmbedding,
    SharedEmbeddingNetwork,
    SpeechBlock,
    SpeechMoE,
    SpeechOutput,
    matched_dense_hidden,
)
from moezoo.modalities.speech.task import SpeechRecognition, ctc_loss

__all__ = [
    "COMMANDS",
    "DIGITS",
    "KEYWORDS",
    "CharTokenizer",
    "FSMNMemory",
    "GlobalEmbedding",
    "SharedEmbeddingNetwork",
    "SpecAugment",
    "SpeechBlock",
    "SpeechDataModule",
    "SpeechDataset",
    "SpeechFeatures",
    "SpeechMoE",
    "SpeechOutput",
    "SpeechRecognition",
    "Utterance",
    "character_error_rate",
    "collate_speech",
    "ctc_loss",
    "edit_distance",
    "evaluate_speech",
    "generate_transcripts",
    "greedy_ctc_decode",
    "matched_dense_hidden",
    "normalize_utterance",
    "render_espeak_split",
]
