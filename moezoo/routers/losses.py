"""Auxiliary routing losses as pure functions, unweighted, each as its paper defines it.

Losses that take ``(..., tokens, experts)`` inputs compute one value per leading index (a routing
group, as V-MoE routes per group of images) and return their mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "cv_squared",
    "importance_loss",
    "load_balancing_loss",
    "load_loss",
    "z_loss",
]


def _check_routing_tensor(t: Tensor, name: str) -> None:
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., tokens, experts), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation over the last dim, population std (ddof=0).

    Args:
        values: (..., experts).

    Returns:
        (...,) ``(std / mean) ** 2``.
    """
    return values.var(dim=-1, unbiased=False) / values.mean(dim=-1).pow(2)


def importance_loss(probs: Tensor) -> Tensor:
    """Importance loss (Shazeer et al. 2017; V-MoE): CV² of the per-expert sum of probabilities.

    Args:
        probs: (..., tokens, experts) **clean** (noise-free) softmax probabilities.

    Returns:
        0-dim: mean over leading (group) dims of ``cv_squared(probs.sum(tokens))``.
    """
    _check_routing_tensor(probs, "probs")
    return cv_squared(probs.float().sum(dim=-2)).mean()


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float | Tensor, k: int) -> Tensor:
    """V-MoE's smooth load loss: CV² of each expert's expected load under the routing noise.

    The threshold of a token is its k-th largest *noisy* logit (the expert itself included, as in
    V-MoE; Shazeer 2017 excludes it). ``p = 1 - Phi((threshold - clean logit) / noise_std)`` is the
    probability the expert stays in the token's top k under fresh noise.

    Args:
        logits: (..., tokens, experts) clean logits.
        noisy_logits: (..., tokens, experts) the logits plus the noise actually drawn.
        noise_std: noise standard deviation (V-MoE: ``1 / experts``), a float or a tensor
            broadcastable to ``logits`` (learned noise).
        k: experts chosen per token.

    Returns:
        0-dim: mean over leading dims of ``cv_squared(mean over tokens of p)``.
    """
    _check_routing_tensor(logits, "logits")
    if noisy_logits.shape != logits.shape:
        raise ValueError(
            f"noisy_logits shape {tuple(noisy_logits.shape)} must equal logits shape {tuple(logits.shape)}"
        )
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, experts={logits.shape[-1]}], got {k}")
    threshold = torch.topk(noisy_logits.float(), k, dim=-1).values[..., -1:]
    p = 1.0 - torch.special.ndtr((threshold - logits.float()) / noise_std)
    return cv_squared(p.mean(dim=-2)).mean()


def load_balancing_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch Transformer / GShard balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the share of assignments that chose expert e (counted before any capacity drop),
    ``P_e`` the mean probability of e. Equals 1 for a uniform router.

    Args:
        probs: (tokens, experts) probabilities.
        expert_index: (tokens,) or (tokens, k) int64 chosen experts.

    Returns:
        0-dim loss.
    """
    _check_routing_tensor(probs, "probs")
    num_experts = probs.shape[-1]
    probs = probs.reshape(-1, num_experts).float()
    if expert_index.dim() not in (1, 2) or expert_index.shape[0] != probs.shape[0]:
        raise ValueError(
            f"expert_index must have shape (tokens,) or (tokens, k) with tokens={probs.shape[0]}, "
            f"got {tuple(expert_index.shape)}"
        )
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).float()
    share = counts / counts.sum()
    return num_experts * (share * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits) ** 2``.

    Args:
        logits: (..., tokens, experts).
    """
    _check_routing_tensor(logits, "logits")
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
