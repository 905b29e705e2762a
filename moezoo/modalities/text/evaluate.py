"""Evaluation of language models on a text split, for model cards and the comparison report."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from moezoo.layers.routed import routed_layers
from moezoo.modalities.text.data import TextDataModule
from moezoo.modalities.text.segments import SegmentTextDataModule
from moezoo.modalities.text.task import lm_loss

__all__ = ["evaluate_lm", "evaluate_pydoc", "forward_macs"]


@torch.no_grad()
def evaluate_lm(model: nn.Module, datamodule: TextDataModule, split: str = "val") -> dict[str, float]:
    """Token-mean cross-entropy, perplexity and bits per byte of ``model`` on ``split`` (all of its
    consecutive windows), plus the mean router entropy of the routed layers where they report one."""
    datamodule.setup()
    loader = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()
    model.eval()
    nll_sum, tokens = 0.0, 0
    for batch in loader:
        loss, n = lm_loss(model, batch)
        nll_sum += loss.item() * n
        tokens += n
    nll = nll_sum / tokens
    result = {
        "loss": nll,
        "perplexity": math.exp(nll),
        "bits_per_byte": nll / math.log(2.0) / datamodule.bytes_per_token(split),
        "tokens": tokens,
        "examples": tokens,
    }
    entropies = [float(layer.last_stats["entropy"]) for _, layer in routed_layers(model) if "entropy" in layer.last_stats]
    if entropies:
        result["router_entropy"] = sum(entropies) / len(entropies)
    return result


def evaluate_pydoc(model: nn.Module) -> dict[str, float]:
    """:func:`evaluate_lm` on the built-in corpus' validation split, byte-level, with the model's
    context length (``model.context_length``, default 128) and batches of 16 windows; for a model
    with segment memory (``memory_length > 0``) 16 streams of consecutive segments."""
    context = getattr(model, "context_length", 128)
    data = SegmentTextDataModule if getattr(model, "memory_length", 0) else TextDataModule
    return evaluate_lm(model, data("pydoc_topics", "bytes", context, eval_batch_size=16), "val")


@torch.no_grad()
def forward_macs(model: nn.Module, tokens: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of a :class:`~moezoo.modalities.text.TransformerLM`
    on ``tokens`` (B, T).

    Matrix products are counted by torch's FlopCounterMode as executed (a routed expert counts only
    the rows it received); attention is counted analytically, since FlopCounterMode does not see
    every fused attention kernel: per block, ``attention maps x B x T x T x head_dim`` for the scores
    plus as many for the weighted values (the full T x T maps that the kernels compute).
    """
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    flops = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items()
                if "scaled_dot_product" not in str(op))
    batch, length = tokens.shape
    attention = sum(2 * block.attn.attention_matrices * batch * length * length * block.attn.head_dim
                    for block in model.blocks)
    return flops // 2 + attention
