"""Zero-shot classification, image-text retrieval and expert specialisation of image-text models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.layers.multimodal_moe import MultimodalMoE
from moezoo.modalities.language_image.data import ImageTextDataModule, class_prompts

__all__ = [
    "embed_split",
    "evaluate_glyphs",
    "evaluate_image_text",
    "expert_modality_shares",
    "retrieval_recall",
    "zero_shot_accuracy",
]


def retrieval_recall(image: Tensor, text: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k of image i finding text i among all texts (i2t) and of text i finding image i (t2i).

    Args:
        image, text: (N, dim) normalised embeddings of N pairs.
    """
    similarity = image @ text.t()
    target = torch.arange(image.shape[0], device=image.device)
    out = {}
    for direction, scores in (("i2t", similarity), ("t2i", similarity.t())):
        # rank of the true partner = how many candidates score strictly higher
        rank = (scores > scores[target, target].unsqueeze(1)).sum(dim=1)
        for k in ks:
            out[f"{direction}_recall@{k}"] = (rank < k).float().mean().item()
    return out


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, datamodule: ImageTextDataModule, image: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of classifying images by their nearest class prompt embedding; each class
    embedding is the normalised mean of its prompt-template embeddings (CLIP's prompt ensembling)."""
    prompts = class_prompts()
    ids, mask = datamodule.tokenize([p for per_class in prompts for p in per_class])
    text = model.encode(text=ids.to(image.device), text_mask=mask.to(image.device))["text"]
    classes = F.normalize(text.view(len(prompts), len(prompts[0]), -1).mean(dim=1), dim=-1)
    return ((image @ classes.t()).argmax(dim=1) == labels.to(image.device)).float().mean().item()


@torch.no_grad()
def embed_split(model: nn.Module, datamodule: ImageTextDataModule, split: str) -> tuple[Tensor, Tensor, Tensor]:
    """(image embeddings, text embeddings, labels) of a split, in order."""
    datamodule.setup()
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()
    model.eval()
    images, texts, labels = [], [], []
    for pixels, ids, mask, label in loader:
        a, b, _ = model(pixels, ids, mask)
        images.append(a)
        texts.append(b)
        labels.append(label)
    return torch.cat(images), torch.cat(texts), torch.cat(labels)


def evaluate_image_text(model: nn.Module, datamodule: ImageTextDataModule, split: str = "test") -> dict[str, float]:
    """Zero-shot accuracy (when the split has class labels) and retrieval recall@1/5 on ``split``."""
    image, text, labels = embed_split(model, datamodule, split)
    metrics = retrieval_recall(image, text)
    if (labels >= 0).all():
        metrics = {"zero_shot_accuracy": zero_shot_accuracy(model, datamodule, image, labels), **metrics}
    return {**metrics, "examples": image.shape[0]}


def evaluate_glyphs(model: nn.Module) -> dict[str, float]:
    """:func:`evaluate_image_text` on the built-in glyphs' test fonts (3 fonts never seen in training)."""
    return evaluate_image_text(model, ImageTextDataModule("glyphs"), "test")


@torch.no_grad()
def expert_modality_shares(model: nn.Module, datamodule: ImageTextDataModule, split: str = "test") -> dict:
    """Per MoE layer and expert: the share of all image tokens and of all text tokens it receives, and
    the fraction of its own tokens that are image tokens (1 = image-only expert, 0 = text-only)."""
    counts: dict[str, dict[str, Tensor]] = {}
    hooks = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MultimodalMoE)]

    def record(name):
        def hook(module, args, output):
            for modality in ("image", "text"):
                c = module.last_stats.get(f"{modality}/tokens_per_expert")
                if c is not None:
                    per = counts.setdefault(name, {})
                    per[modality] = per.get(modality, torch.zeros_like(c)) + c
        return hook

    for name, layer in layers:
        hooks.append(layer.register_forward_hook(record(name)))
    try:
        embed_split(model, datamodule, split)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, per in counts.items():
        image, text = per["image"], per["text"]
        # Image tokens outnumber text tokens; compare the modalities' token *shares*.
        image_share, text_share = image / image.sum(), text / text.sum()
        out[name] = {
            "image_share": image_share.tolist(),
            "text_share": text_share.tolist(),
            "image_fraction_of_expert": (image_share / (image_share + text_share).clamp_min(1e-12)).tolist(),
            "experts_used_by_image": int((image_share > 0.01).sum()),
            "experts_used_by_text": int((text_share > 0.01).sum()),
        }
    return out
