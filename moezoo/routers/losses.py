"""Auxiliary routing losses as pure functions, unweighted, each as its paper defines it.

Losses that take ``(..., tokens, experts)`` inputs compute one value per leading index (a routing
group, as V-MoE routes per group of images) and return their mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from moezoo.routers.functional import bincount

__all__ = [
    "cv_squared",
    "global_entropy_loss",
    "importance_loss",
    "load_balancing_loss",
    "load_loss",
    "local_entropy_loss",
    "marginal_entropy_loss",
    "mean_importance_loss",
    "moa_cv_loss",
    "pooled_load_balancing_loss",
    "process_log_mean_exp",
    "process_mean",
    "sparsity_l1_loss",
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
    counts = bincount(expert_index, num_experts).float()
    share = counts / counts.sum()
    return num_experts * (share * probs.mean(dim=0)).sum()


def pooled_load_balancing_loss(logits: Sequence[Tensor], k: int, mask: Tensor | None = None) -> Tensor:
    """transformers' ``load_balancing_loss_func`` (Mixtral, Qwen-MoE, OLMoE, PhiMoE): one Switch
    loss ``E * sum_e f_e * P_e`` over the tokens of every layer pooled together.

    Per layer ``p = softmax(logits)`` over all experts and its top ``k``; over all layers and tokens,
    ``f_e`` is the count of e among the top-k choices divided by (layers x tokens), so the ``f_e``
    sum to k, and ``P_e`` the mean of ``p_e``. Against :func:`load_balancing_loss` (per layer, shares
    summing to 1): for one layer this is k times it; for several it is the product of the layer
    means, not the mean of per-layer products.

    Args:
        logits: one (tokens, experts) router-logit tensor per layer, same experts.
        k: experts per token.
        mask: optional (tokens,) weights (transformers' flattened attention mask: 0 for padding),
            applied to every layer's tokens.

    Returns:
        0-dim loss.
    """
    if not logits:
        raise ValueError("pooled_load_balancing_loss needs the logits of at least one layer")
    num_experts = logits[0].shape[-1]
    counts = logits[0].new_zeros(num_experts, dtype=torch.float32)
    prob_sum = torch.zeros_like(counts)
    rows = counts.new_zeros(())
    for layer in logits:
        _check_routing_tensor(layer, "logits")
        if layer.dim() != 2 or layer.shape[-1] != num_experts:
            raise ValueError(f"every layer's logits must have shape (tokens, {num_experts}), got {tuple(layer.shape)}")
        probs = torch.softmax(layer.float(), dim=-1)
        chosen = torch.topk(probs, k, dim=-1).indices.reshape(-1)
        weight = probs.new_ones(probs.shape[0]) if mask is None else mask.reshape(-1).to(probs)
        if weight.shape[0] != probs.shape[0]:
            raise ValueError(f"mask has {weight.shape[0]} entries for {probs.shape[0]} tokens")
        counts = counts.index_add(0, chosen, weight.repeat_interleave(k))
        prob_sum = prob_sum + (probs * weight.unsqueeze(-1)).sum(dim=0)
        rows = rows + weight.sum()
    return num_experts * ((counts / rows) * (prob_sum / rows)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits) ** 2``.

    Args:
        logits: (..., tokens, experts).
    """
    _check_routing_tensor(logits, "logits")
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=dim)


def local_entropy_loss(probs: Tensor, *, across_processes: bool = False) -> Tensor:
    """LIMoE's local entropy loss: the mean over tokens of each token's routing entropy,
    ``(1/n) sum_x H(p(.|x))``; minimising it makes every token's routing confident.

    Args:
        probs: (tokens, experts) router probabilities of the tokens of one modality.
        across_processes: the mean over the tokens of every process (:func:`process_mean`), LIMoE's
            batch being the global batch; every process must call at the same point.
    """
    _check_routing_tensor(probs, "probs")
    entropy = _entropy(probs.float())
    if across_processes:
        return process_mean(entropy.reshape(-1, 1)).squeeze(0)
    return entropy.mean()


def global_entropy_loss(probs: Tensor, threshold: float | None = None, *, across_processes: bool = False) -> Tensor:
    """LIMoE's global entropy loss: minus the entropy of the modality's mean routing distribution,
    ``-H(mean_x p(.|x))``; minimising it spreads the modality over many experts. With ``threshold``
    tau it is ``max(0, tau - H(mean_x p))``: no pressure once the modality uses about ``exp(tau)``
    experts' worth of entropy (LIMoE's thresholded variant, so a modality may keep a subset).

    Args:
        probs: (tokens, experts) router probabilities of the tokens of one modality.
        threshold: tau in nats, or None for the plain loss.
        across_processes: the mean distribution over the tokens of every process
            (:func:`process_mean`): LIMoE (arXiv 2206.02770, Sec. 3.1) defines ``p_m(experts)`` over
            the batch's tokens of modality m, and its batch is the global one. Every process must
            call at the same point. Local without a process group.
    """
    _check_routing_tensor(probs, "probs")
    p = probs.float().reshape(-1, probs.shape[-1])
    entropy = _entropy(process_mean(p) if across_processes else p.mean(dim=0))
    if threshold is None:
        return -entropy
    return torch.clamp(threshold - entropy, min=0.0)


def sparsity_l1_loss(probs: Tensor, eps: float = 1e-20) -> Tensor:
    """SpeechMoE's sparsity L1 loss: mean over frames of the L1 norm of the unit-L2 router distribution,
    ``(1/m) sum_i || p_i / ||p_i||_2 ||_1``: 1 when every frame's distribution is one-hot, sqrt(n) when
    uniform over n experts (formula as in the authors' later code, tencent-ailab/3m-asr).

    Args:
        probs: (..., frames, experts) router probabilities (softmax output).
        eps: floor of the L2 norm.
    """
    _check_routing_tensor(probs, "probs")
    p = probs.float().reshape(-1, probs.shape[-1])
    unit = p / p.norm(p=2, dim=-1, keepdim=True).clamp_min(eps)
    return unit.abs().sum(dim=-1).mean()


def mean_importance_loss(probs: Tensor) -> Tensor:
    """SpeechMoE's mean importance loss ``n * sum_j Imp_j^2`` with ``Imp = (1/m) sum_i p_i`` the mean
    router distribution over the m frames: 1 when the experts' mean probabilities are equal, n when
    one expert takes everything.

    Args:
        probs: (..., frames, experts) router probabilities.
    """
    _check_routing_tensor(probs, "probs")
    p = probs.float().reshape(-1, probs.shape[-1])
    return p.shape[-1] * p.mean(dim=0).pow(2).sum()


def moa_cv_loss(gates: Tensor) -> Tensor:
    """MoA's ``cvloss``: CV² of the L1-normalised per-expert sum of the kept gates.

    Unlike :func:`moezoo.routers.losses.cv_squared` (population variance, V-MoE) this is the
    reference's convention: torch's **unbiased** variance and ``mean² + 1e-10`` in the denominator;
    0 for a single expert.

    Args:
        gates: (tokens, experts) combine weights, zero where an expert is not selected.

    Returns:
        0-dim loss.
    """
    if gates.dim() != 2:
        raise ValueError(f"gates must have shape (tokens, experts), got shape {tuple(gates.shape)}")
    if gates.shape[1] == 1:
        return gates.new_zeros(())
    share = F.normalize(gates.float().sum(0), p=1, dim=0)
    return share.var() / (share.mean() ** 2 + 1e-10)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_mean(x: Tensor) -> Tensor:
    """The mean over the tokens of every process: x (tokens, n) -> (n,), differentiable.

    As :func:`process_log_mean_exp`: an autograd-aware all-reduce of the sums and of the token
    counts, so processes may hold different numbers of tokens (text padding) and, after
    data-parallel gradient averaging, the gradient equals one process's on the union. Every process
    must call it at the same point. Without a process group it is the local mean.
    """
    if not _distributed():
        return x.mean(dim=0)
    from torch.distributed.nn.functional import all_reduce

    total = all_reduce(x.sum(dim=0), op=dist.ReduceOp.SUM)
    count = torch.tensor(float(x.shape[0]), device=x.device)
    dist.all_reduce(count)
    return total / count


def process_log_mean_exp(x: Tensor) -> Tensor:
    """``log(mean over the tokens of every process of exp(x))``: x (tokens, n) -> (n,), differentiable.

    The sum is an autograd-aware all-reduce (its backward sums the processes' gradients), so after
    data-parallel gradient averaging the gradient equals one process's on the union of the tokens.
    Every process must call it at the same point. Without a process group it is the local value.
    """
    if not _distributed():
        return torch.logsumexp(x, dim=0) - math.log(x.shape[0])
    from torch.distributed.nn.functional import all_reduce

    shift = x.detach().amax(dim=0)  # a constant for the gradient: log-sum-exp is shift-invariant
    dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    total = all_reduce((x - shift).exp().sum(dim=0), op=dist.ReduceOp.SUM)
    count = torch.tensor(float(x.shape[0]), device=x.device)
    dist.all_reduce(count)
    return shift + total.log() - count.log()


def marginal_entropy_loss(logits: Tensor, *, across_processes: bool = False) -> Tensor:
    """σ-MoE's entropy regulariser: ``-H(mean over tokens of softmax(logits))``.

    Computed in log space as the reference (log-softmax, then log-mean-exp over the tokens). It uses
    the **softmax** of the raw selection logits even where routing uses sigmoid scores. Minimising
    it spreads the batch's selections over all experts.

    Args:
        logits: (..., tokens, experts) raw selection logits; one marginal per leading index.
        across_processes: the marginal over the tokens of every process (the reference's
            ``perplexity_reg_mode="global"`` with ``sync_distributed``, which all-reduces the
            log-sum-exp); needs (tokens, experts) logits and every process calling at the same point
            (:func:`process_log_mean_exp`). Local without a process group.

    Returns:
        0-dim: the mean over leading indices of the negative marginal entropy (nats).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., tokens, experts), got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    if across_processes:
        if logits.dim() != 2:
            raise ValueError(f"across_processes needs logits of shape (tokens, experts), got {tuple(logits.shape)}")
        log_marginal = process_log_mean_exp(log_p)
    else:
        log_marginal = torch.logsumexp(log_p, dim=-2) - math.log(log_p.shape[-2])
    entropy = -(log_marginal.exp() * log_marginal).sum(-1)
    return -entropy.mean()
