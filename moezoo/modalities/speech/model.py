"""SpeechMoE acoustic models (You et al. 2021, arXiv 2105.03036) and the SpeechMoE2 router input (2111.11831).

A CTC acoustic model on stacked filterbank frames. Each block is an MoE layer of feed-forward experts
followed by a sequential memory layer (DFSMN-style, a per-dimension FIR filter over past and future
frames). A small shared embedding network with its own CTC head gives every frame an embedding e;
each MoE layer's router scores experts from ``[e; x]`` (x: the layer's input) and sends the frame to
its top-1 expert, scaled by the gate value (:class:`~moezoo.routers.speech_moe.SpeechMoERouter`).
SpeechMoE2 adds utterance-level domain and accent embeddings, learnt by auxiliary classifiers, to
the router input. With ``num_experts=None`` the same network is the dense ("static") baseline.

What is from the papers and what is ours (no public code exists for either paper):

- from the abstracts: MoE layers, the shared embedding network feeding the routers together with
  the layer's representation, the sparsity L1 and mean importance losses, CTC; SpeechMoE2's global
  domain and accent embeddings in the router input;
- from the authors' later public code (3M-ASR, same team): router input ``cat([e, x])``, bias-free
  gate with Xavier(0.5) init, top-1 with the output scaled by the gate value, no capacity, e
  detached before the routers, the embedding network trained by its own CTC loss;
- recalled, not verified: the sequential memory layer after each MoE layer, 40-dim fbank, frame
  stacking; ours: pre-LayerNorm residual blocks, ReLU experts, statistics pooling for the global
  embeddings, masked mean pooling for the keyword head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.layers.mlp import MLP
from moezoo.layers.moe import MoE
from moezoo.layers.routed import parameter_counts
from moezoo.routers.speech_moe import SPEECHMOE_LOSS_WEIGHTS, SpeechMoERouter

__all__ = [
    "FSMNMemory",
    "GlobalEmbedding",
    "SharedEmbeddingNetwork",
    "SpeechBlock",
    "SpeechMoE",
    "SpeechOutput",
    "lengths_to_mask",
    "matched_dense_hidden",
    "stack_frames",
]


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(batch,) lengths -> (batch, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def stack_frames(features: Tensor, lengths: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Low-frame-rate stacking: every ``factor`` consecutive frames become one.

    Args:
        features: (batch, frames, bins), zero beyond each length.
        lengths: (batch,) valid frames.

    Returns:
        (batch, ceil(frames / factor), factor * bins) and the (batch,) new lengths ``ceil(len / factor)``.
    """
    batch, frames, bins = features.shape
    pad = (-frames) % factor
    if pad:
        features = F.pad(features, (0, 0, 0, pad))
    stacked = features.reshape(batch, (frames + pad) // factor, factor * bins)
    return stacked, torch.div(lengths + factor - 1, factor, rounding_mode="floor")


class FSMNMemory(nn.Module):
    """DFSMN memory block: ``m_t = sum_{i=0}^{left} a_i * h_{t - s*i} + sum_{j=1}^{right} c_j * h_{t + s*j}``
    with per-dimension coefficients a, c (a depthwise 1-d convolution over time, stride s between taps).

    ``forward(h: (batch, frames, dim), mask: (batch, frames)) -> (batch, frames, dim)``; frames outside
    the mask are zeroed first, so padding never leaks into valid frames.
    """

    def __init__(self, dim: int, left: int = 4, right: int = 2, stride: int = 1) -> None:
        super().__init__()
        self.dim = require_int("FSMNMemory", "dim", dim)
        self.left = require_int("FSMNMemory", "left", left, 0)
        self.right = require_int("FSMNMemory", "right", right, 0)
        self.stride = require_int("FSMNMemory", "stride", stride)
        self.filter = nn.Conv1d(dim, dim, left + right + 1, dilation=stride, groups=dim, bias=False)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        h = (h * mask.unsqueeze(-1)).transpose(1, 2)
        h = F.pad(h, (self.left * self.stride, self.right * self.stride))
        return self.filter(h).transpose(1, 2)


class SpeechBlock(nn.Module):
    """One SpeechMoE layer: ``x + FFN(LN(x))`` (an MoE of expert MLPs, or a dense MLP) then
    ``x + Memory(LN(x))``. The feed-forward part runs on valid frames only, so padding neither
    costs expert compute nor enters the routing losses.

    Args:
        dim: width.
        hidden: hidden width of each expert (or of the dense MLP).
        num_experts: experts; ``None`` for a dense MLP.
        router: the router of the MoE (needs ``num_experts``).
        memory_left, memory_right, memory_stride: the FSMN memory's taps.
        dropout: dropout on both residual branches (and inside experts).
        activation: expert / MLP activation.
        aux_loss_weights: coefficients of the router losses on the MoE layer.
        backend: expert-computation backend.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int | None = None,
        router: nn.Module | None = None,
        *,
        memory_left: int = 4,
        memory_right: int = 2,
        memory_stride: int = 1,
        dropout: float = 0.1,
        activation: str = "relu",
        aux_loss_weights: Mapping[str, float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm_ffn = nn.LayerNorm(dim)
        if num_experts is None:
            self.ffn = MLP(dim, hidden, activation)
        else:
            if router is None:
                raise ValueError("SpeechBlock: an MoE block needs its router")
            self.ffn = MoE(dim, hidden, num_experts, router, activation=activation, dropout=dropout,
                           backend=backend, aux_loss_weights=aux_loss_weights)
        self.norm_memory = nn.LayerNorm(dim)
        self.memory = FSMNMemory(dim, memory_left, memory_right, memory_stride)
        self.dropout = nn.Dropout(dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x: Tensor, mask: Tensor, route_on: Tensor | None = None) -> Tensor:
        """x: (batch, frames, dim); mask: (batch, frames); route_on: (valid frames, features) the
        router's extra input (``[e; g]`` at the valid frames, in mask order) for an MoE block."""
        h = self.norm_ffn(x)
        frames = h[mask]
        if self.is_moe:
            if route_on is None:
                raise ValueError("SpeechBlock: an MoE block needs route_on (the embeddings for its router)")
            y = self.ffn(frames, router_input=SpeechMoERouter.router_input(frames, route_on))
        else:
            y = self.ffn(frames)
        x = x + self.dropout(torch.zeros_like(h).index_put((mask,), y))
        return x + self.dropout(self.memory(self.norm_memory(x), mask))


class SharedEmbeddingNetwork(nn.Module):
    """SpeechMoE's shared embedding network: dense blocks with their own CTC head over graphemes.

    ``forward(stacked: (batch, frames, in_dim), mask) -> (embedding (batch, frames, dim), logits
    (batch, frames, vocab))``.
    """

    def __init__(self, in_dim: int, vocab_size: int, dim: int = 64, depth: int = 2, hidden: int = 128, *,
                 memory_left: int = 4, memory_right: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            SpeechBlock(dim, hidden, memory_left=memory_left, memory_right=memory_right, dropout=dropout)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, stacked: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.proj(stacked)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        return x, self.head(x)


class GlobalEmbedding(nn.Module):
    """SpeechMoE2's utterance-level embedding (one for domain, one for accent): statistics pooling
    (mean and std over valid frames) of the shared embedding, ``tanh(Linear)``, and a classifier trained
    on the utterance's label.

    ``forward(e: (batch, frames, in_dim), mask) -> (embedding (batch, dim), logits (batch, classes))``.
    """

    def __init__(self, in_dim: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * in_dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, e: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        weights = mask.unsqueeze(-1).to(e.dtype)
        count = weights.sum(1).clamp_min(1.0)
        mean = (e * weights).sum(1) / count
        var = (((e - mean.unsqueeze(1)) ** 2) * weights).sum(1) / count
        g = torch.tanh(self.proj(torch.cat([mean, var.clamp_min(1e-8).sqrt()], dim=-1)))
        return g, self.classifier(g)


@dataclass
class SpeechOutput:
    """What :class:`SpeechMoE` returns.

    Attributes:
        logits: (batch, frames, vocab) CTC logits (blank = 0).
        lengths: (batch,) valid output frames.
        embed_logits: (batch, frames, vocab) the embedding network's CTC logits, or None (dense).
        keyword_logits: (batch, keywords) or None.
        global_logits: SpeechMoE2's classifier logits by name (e.g. ``"accent"``: (batch, classes)).
    """

    logits: Tensor
    lengths: Tensor
    embed_logits: Tensor | None = None
    keyword_logits: Tensor | None = None
    global_logits: dict[str, Tensor] = field(default_factory=dict)


class SpeechMoE(nn.Module):
    """SpeechMoE / SpeechMoE2 CTC acoustic model, or its dense baseline.

    ``forward(features: (batch, frames, input_dim), lengths: (batch,)) -> SpeechOutput``.

    Args:
        input_dim: feature bins per frame.
        vocab_size: CTC output symbols including the blank (index 0).
        dim: model width.
        depth: number of blocks (MoE layer + memory layer).
        hidden: hidden width of each expert (dense: of each block's MLP).
        num_experts: experts per MoE layer; ``None`` builds the dense baseline (no embedding network,
            no routers).
        k: experts per frame (paper: 1).
        stack: frames stacked into one (the output frame rate is 1/stack of the input's).
        memory_left, memory_right, memory_stride: taps of each memory layer, in output frames.
        embed_dim, embed_depth, embed_hidden: the shared embedding network.
        detach_embedding: routers see the embedding without back-propagating into it (as the
            authors' code does); the embedding network then learns from its own losses only.
        global_embeddings: SpeechMoE2: name -> number of classes of each utterance-level embedding
            added to the router input (e.g. ``{"domain": 2, "accent": 8}``); None for SpeechMoE.
        global_dim: size of each global embedding.
        num_keywords: classes of a keyword/command head on the mean-pooled last layer; 0 = none.
        dropout: dropout on residual branches and in experts.
        activation: expert / MLP activation.
        router_init_gain: Xavier gain of the routers' gates.
        aux_loss_weights: router-loss coefficients (default: alpha = beta = 0.1).
        backend: expert-computation backend ("auto", "torch", "triton").
    """

    def __init__(
        self,
        input_dim: int = 40,
        vocab_size: int = 29,
        dim: int = 128,
        depth: int = 4,
        hidden: int = 256,
        num_experts: int | None = 4,
        k: int = 1,
        stack: int = 3,
        memory_left: int = 4,
        memory_right: int = 2,
        memory_stride: int = 1,
        embed_dim: int = 64,
        embed_depth: int = 2,
        embed_hidden: int = 128,
        detach_embedding: bool = True,
        global_embeddings: dict[str, int] | None = None,
        global_dim: int = 16,
        num_keywords: int = 0,
        dropout: float = 0.1,
        activation: str = "relu",
        router_init_gain: float = 0.5,
        aux_loss_weights: dict[str, float] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        owner = "SpeechMoE"
        for name, value in (("input_dim", input_dim), ("dim", dim), ("depth", depth), ("hidden", hidden),
                            ("stack", stack), ("embed_dim", embed_dim), ("embed_hidden", embed_hidden),
                            ("global_dim", global_dim)):
            require_int(owner, name, value)
        require_int(owner, "vocab_size", vocab_size, 2)
        require_int(owner, "num_keywords", num_keywords, 0)
        require_int(owner, "embed_depth", embed_depth, 0)
        if num_experts is not None:
            require_int(owner, "num_experts", num_experts)
        if global_embeddings and num_experts is None:
            raise ValueError("SpeechMoE: global_embeddings (SpeechMoE2) need MoE layers; got num_experts=None")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SpeechMoE: dropout must be in [0, 1), got {dropout}")
        self.input_dim, self.vocab_size, self.stack = input_dim, vocab_size, stack
        self.num_experts, self.num_keywords = num_experts, num_keywords
        self.detach_embedding = detach_embedding
        stacked_dim = stack * input_dim

        self.embedding = None
        self.global_embeddings = nn.ModuleDict()
        if num_experts is not None:
            self.embedding = SharedEmbeddingNetwork(
                stacked_dim, vocab_size, embed_dim, embed_depth, embed_hidden,
                memory_left=memory_left, memory_right=memory_right, dropout=dropout,
            )
            for name, classes in (global_embeddings or {}).items():
                require_int(owner, f"global_embeddings[{name!r}]", classes, 2)
                self.global_embeddings[name] = GlobalEmbedding(embed_dim, global_dim, classes)
        extra = len(self.global_embeddings) * global_dim
        weights = dict(SPEECHMOE_LOSS_WEIGHTS if aux_loss_weights is None else aux_loss_weights)

        self.proj = nn.Linear(stacked_dim, dim)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            router = None
            if num_experts is not None:
                router = SpeechMoERouter(dim, num_experts, embed_dim=embed_dim, global_dim=extra, k=k,
                                         init_gain=router_init_gain)
            self.blocks.append(SpeechBlock(
                dim, hidden, num_experts, router, memory_left=memory_left, memory_right=memory_right,
                memory_stride=memory_stride, dropout=dropout, activation=activation, aux_loss_weights=weights,
                backend=backend,
            ))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.keyword_head = nn.Linear(dim, num_keywords) if num_keywords else None

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, features: Tensor, lengths: Tensor) -> SpeechOutput:
        if features.dim() != 3 or features.shape[-1] != self.input_dim:
            raise ValueError(
                f"SpeechMoE: features must have shape (batch, frames, {self.input_dim}), got {tuple(features.shape)}"
            )
        if lengths.shape != features.shape[:1]:
            raise ValueError(f"SpeechMoE: lengths must have shape ({features.shape[0]},), got {tuple(lengths.shape)}")
        lengths = lengths.to(features.device)
        stacked, out_lengths = stack_frames(features, lengths, self.stack)
        mask = lengths_to_mask(out_lengths, stacked.shape[1])

        embed_logits, route_on, global_logits = None, None, {}
        if self.embedding is not None:
            e, embed_logits = self.embedding(stacked, mask)
            parts = [e]
            for name, module in self.global_embeddings.items():
                g, global_logits[name] = module(e, mask)
                parts.append(g.unsqueeze(1).expand(-1, e.shape[1], -1))
            route = torch.cat(parts, dim=-1)
            if self.detach_embedding:
                route = route.detach()
            route_on = route[mask]

        x = self.proj(stacked)
        for block in self.blocks:
            x = block(x, mask, route_on)
        x = self.norm(x)
        keyword_logits = None
        if self.keyword_head is not None:
            weights = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            keyword_logits = self.keyword_head(pooled)
        return SpeechOutput(self.head(x), out_lengths, embed_logits, keyword_logits, global_logits)


def matched_dense_hidden(**moe_args) -> int:
    """The dense baseline's MLP width whose parameter count is closest to the active parameters per
    frame of ``SpeechMoE(**moe_args)`` (its embedding network, routers, global embeddings and one
    expert per layer per frame all count as active)."""
    target = parameter_counts(SpeechMoE(**moe_args))["active"]
    dense_args = {k: v for k, v in moe_args.items() if k not in ("global_embeddings",)}
    dense_args.update(num_experts=None)

    def count(hidden: int) -> int:
        return sum(p.numel() for p in SpeechMoE(**{**dense_args, "hidden": hidden}).parameters())

    base = count(1)
    per_unit = count(2) - base
    guess = max(1, 1 + round((target - base) / per_unit))
    return min((guess - 1, guess, guess + 1), key=lambda h: abs(count(max(h, 1)) - target))
