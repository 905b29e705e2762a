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
    "device_balance_loss",
    "global_entropy_loss",
    "global_load_balancing_loss",
    "importance_loss",
    "load_balancing_loss",
    "load_loss",
    "local_entropy_loss",
    "marginal_entropy_loss",
    "mean_importance_loss",
    "moa_cv_loss",
    "mutual_information_loss",
    "pooled_load_balancing_loss",
    "process_log_mean_exp",
    "process_mean",
    "selector_entropy_loss",
    "sequence_balance_loss",
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


def _check_choices(probs: Tensor, expert_index: Tensor) -> None:
    if expert_index.dim() != probs.dim() or expert_index.shape[:-1] != probs.shape[:-1]:
        raise ValueError(
            f"expert_index must have shape (..., tokens, k) matching probs {tuple(probs.shape)}, "
            f"got {tuple(expert_index.shape)}"
        )
    if expert_index.dtype != torch.int64:
        raise ValueError(f"expert_index must be int64, got dtype {expert_index.dtype}")


def _expert_frequency(probs: Tensor, expert_index: Tensor) -> Tensor:
    """DeepSeek's ``f_i = E / (k T) * (count of i among the top-k of the T tokens)``: (..., experts),
    1 for every expert of a perfectly balanced router."""
    num_experts, (num_tokens, k) = probs.shape[-1], expert_index.shape[-2:]
    counts = F.one_hot(expert_index, num_experts).sum(dim=(-3, -2)).float()
    return counts * (num_experts / (k * num_tokens))


def sequence_balance_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eq. 17-20), unweighted:
    per sequence of T tokens, ``sum_i f_i P_i`` with ``f_i = E / (k T) * count_i`` (count_i: tokens of
    the sequence whose top-k holds i) and ``P_i`` the mean over the sequence of the normalised scores
    ``s_i / sum_j s_j``; averaged over the sequences. For one sequence it equals
    :func:`load_balancing_loss`.

    Args:
        probs: (sequences, T, experts) normalised affinities (each token's sum to 1).
        expert_index: (sequences, T, k) int64 experts each token chose.

    Returns:
        0-dim: the mean over sequences (1 for a uniform router with balanced choices).
    """
    _check_routing_tensor(probs, "probs")
    _check_choices(probs, expert_index)
    return (_expert_frequency(probs, expert_index) * probs.float().mean(dim=-2)).sum(dim=-1).mean()


def device_balance_loss(probs: Tensor, expert_index: Tensor, num_devices: int) -> Tensor:
    """DeepSeek-V2's device-level balance loss ``L_DevBal`` (arXiv 2405.04434, sec. 2.2.3), unweighted.

    The E experts form ``num_devices`` groups of E/D consecutive experts (the devices of expert
    parallelism). With the expert-level ``f_j = E / (k T) * count_j`` and ``P_j`` the mean score of
    expert j over the T tokens, ``f'_d`` is the mean of f over device d's experts and ``P'_d`` their
    sum; the loss is ``sum_d f'_d P'_d``. With one expert per device it is :func:`load_balancing_loss`.

    Args:
        probs: (tokens, experts) router scores (DeepSeek-V2: the softmax over all experts).
        expert_index: (tokens, k) int64 chosen experts.
        num_devices: D, a divisor of the experts.

    Returns:
        0-dim loss (1 for a uniform router with balanced choices).
    """
    _check_routing_tensor(probs, "probs")
    _check_choices(probs, expert_index)
    num_experts = probs.shape[-1]
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1 \
            or num_experts % num_devices:
        raise ValueError(f"num_devices must be a positive divisor of the {num_experts} experts, got {num_devices!r}")
    frequency = _expert_frequency(probs, expert_index).reshape(*probs.shape[:-2], num_devices, -1)
    score = probs.float().mean(dim=-2).reshape(*probs.shape[:-2], num_devices, -1)
    return (frequency.mean(dim=-1) * score.sum(dim=-1)).sum(dim=-1).mean()


def global_load_balancing_loss(probs: Tensor, expert_index: Tensor, earlier_counts: Tensor | None = None, *,
                               across_processes: bool = True) -> Tensor:
    """Qwen's global-batch balancing loss (Qiu et al. 2025, arXiv 2501.11440), unweighted:
    ``E * sum_e f_e P_e`` where ``f_e`` is expert e's share of the top-k choices of the **global
    batch** (these tokens, ``earlier_counts`` from the earlier micro-batches of the optimiser step,
    and, under torch.distributed, the same of every process, summed by an all-reduce) and ``P_e``
    the mean probability of e over **these** tokens. Only the counts are communicated; they carry no
    gradient. The local P is what makes data-parallel training exact: with equal token counts per
    process, the mean of the processes' losses (and, after gradient averaging, their gradients) is
    the loss of one process on the union of the tokens. With one process and no earlier counts it
    equals :func:`load_balancing_loss`.

    Args:
        probs: (tokens, experts) router probabilities.
        expert_index: (tokens, k) int64 chosen experts (before any capacity drop).
        earlier_counts: optional (experts,) choice counts of the earlier micro-batches (this
            process's; they are all-reduced with the current ones).
        across_processes: all-reduce the counts when a process group is initialised (every process
            must then call at the same point).

    Returns:
        0-dim loss.
    """
    _check_routing_tensor(probs, "probs")
    _check_choices(probs, expert_index)
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (tokens, experts), got shape {tuple(probs.shape)}")
    num_experts = probs.shape[-1]
    with torch.no_grad():
        counts = bincount(expert_index, num_experts).float()
        if earlier_counts is not None:
            if earlier_counts.shape != (num_experts,):
                raise ValueError(f"earlier_counts must have shape ({num_experts},), got {tuple(earlier_counts.shape)}")
            counts = counts + earlier_counts.to(counts)
        if across_processes and _distributed():
            dist.all_reduce(counts)
        share = counts / counts.sum()
    return num_experts * (share * probs.float().mean(dim=0)).sum()


def mutual_information_loss(logits: Tensor, groups: Tensor | None = None, num_groups: int | None = None, *,
                            eps: float = 1e-8) -> Tensor:
    """ModuleFormer's mutual-information loss (Shen et al. 2023, arXiv 2306.04640), unweighted:
    ``-MI(e; x) = -H(e) + H(e | x)``, minus the entropy of the marginal routing distribution
    ``p(e) = mean_x p(e|x)`` plus the mean conditional entropy. Minimising it balances the marginal
    (the load) while concentrating each condition on few experts. As the authors' ``top_k_gating``
    (``aux_loss="mi"``): x is the token, ``p(e|x) = softmax(logits)``, the conditional entropy comes
    from the log-softmax and the marginal's log has ``eps`` added.

    With ``groups`` the condition is a token's group (its task, for the load concentration of
    multi-task fine-tuning): ``H(e | task) = sum_g p(g) H(p(e|g))`` with ``p(e|g)`` the mean of the
    group's token distributions and ``p(g)`` its share of the tokens.

    Args:
        logits: (tokens, experts) router logits.
        groups: optional (tokens,) int64 group of each token in ``[0, num_groups)``.
        num_groups: the number of groups (needed with ``groups``).
        eps: added inside the marginal's logarithm.

    Returns:
        0-dim loss in nats, in ``[-log E, 0]``.
    """
    _check_routing_tensor(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (tokens, experts), got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    probs = log_p.exp()
    marginal = probs.mean(dim=0)
    marginal_entropy = -(marginal * (marginal + eps).log()).sum()
    if groups is None:
        return -(probs * log_p).sum() / probs.shape[0] - marginal_entropy
    if num_groups is None or groups.shape != (probs.shape[0],) or groups.dtype != torch.int64:
        raise ValueError(
            f"groups must be a (tokens={probs.shape[0]},) int64 tensor with num_groups given, got "
            f"{tuple(groups.shape)} {groups.dtype} and num_groups={num_groups!r}"
        )
    sums = probs.new_zeros(num_groups, probs.shape[1]).index_add(0, groups, probs)
    sizes = sums.sum(dim=-1, keepdim=True)  # tokens per group: each token's probabilities sum to 1
    conditional = sums / sizes.clamp_min(1.0)
    conditional_entropy = (sizes.squeeze(-1) / probs.shape[0] * _entropy(conditional)).sum()
    return conditional_entropy - marginal_entropy


def selector_entropy_loss(selector_outputs: Tensor, eps: float = 1e-6) -> Tensor:
    """DSelect-k's entropy regulariser (Hazimeh et al. 2021, arXiv 2106.03760): the entropy of each
    single-expert selector's output ``r(z)`` over the experts, summed over the selectors and, as the
    official ``EntropyRegularizer`` (``-sum r log(r + eps)``), over the leading dims but one: one
    value per token (example-conditioned gates) averaged over the tokens, so the coefficient does not
    depend on the batch size (the official code sums over the batch too). 0 exactly when every
    selector is one-hot.

    Args:
        selector_outputs: (..., k, experts) selector outputs; (k, experts) for task-only gates.
        eps: added inside the logarithm (official: 1e-6).

    Returns:
        0-dim loss in nats.
    """
    if selector_outputs.dim() < 2 or not selector_outputs.is_floating_point():
        raise ValueError(f"selector_outputs must be a floating (..., k, experts) tensor, got "
                         f"{tuple(selector_outputs.shape)} {selector_outputs.dtype}")
    r = selector_outputs.float()
    per_gate = -(r * torch.log(r + eps)).sum(dim=(-2, -1))
    return per_gate.mean()
