"""Routing math as pure functions: assignment with capacity, expert choice, Sinkhorn, Soft MoE.

Every router in :mod:`moezoo.routers` calls these; they are public so the math can be checked
and reused on its own. Semantics follow V-MoE's reference (google-research/vmoe, ``vmoe/moe.py``):
all first choices take buffer places before any second choice, and with batch priority the tokens
are ordered by their largest probability, highest first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "balanced_assignment",
    "bincount",
    "expert_capacity",
    "expert_choice_assign",
    "group_limited_mask",
    "sigmoid_top_k",
    "sinkhorn",
    "soft_moe_weights",
    "sparse_mixer",
    "top_k",
    "top_k_assign",
]


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    k: int,
    capacity_factor: float,
    *,
    multiple_of: int | None = None,
    rounding: str = "ceil",
) -> int:
    """Buffer places per expert, exactly as V-MoE's ``compute_capacity``.

    ``(k * num_tokens) * capacity_factor / num_experts`` rounded by ``rounding`` ("ceil", or
    "round" = Python's half-to-even), then up to a multiple of ``multiple_of`` (``None``/0: no
    rounding; V-MoE uses ceil and 4). Not clipped to the number of tokens.

    Raises:
        ValueError: if the rounded capacity is below 1 (V-MoE raises too).
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if multiple_of is not None and multiple_of < 0:
        raise ValueError(f"multiple_of must be >= 0 or None, got {multiple_of}")
    if rounding not in ("ceil", "round"):
        raise ValueError(f"rounding must be 'ceil' or 'round', got {rounding!r}")
    # Same float expression and order as the reference, so boundary cases round identically.
    raw = (num_tokens * k) * capacity_factor / num_experts
    capacity = int(math.ceil(raw)) if rounding == "ceil" else int(round(raw))
    if capacity < 1:
        raise ValueError(
            f"expert capacity rounds to {capacity} (< 1) for tokens={num_tokens}, k={k}, "
            f"capacity_factor={capacity_factor}, experts={num_experts}; increase capacity_factor"
        )
    if multiple_of:
        capacity = math.ceil(capacity / multiple_of) * multiple_of
    return capacity


def bincount(index: Tensor, size: int) -> Tensor:
    """(size,) int64: how often each of ``0 .. size - 1`` occurs in the int64 ``index`` (any shape).

    ``torch.bincount``'s output length depends on the largest value, so it syncs with the host and
    breaks ``torch.compile`` graphs; this one has a static length (a value >= size raises).
    """
    flat = index.reshape(-1)
    return torch.zeros(size, dtype=torch.int64, device=index.device).index_add_(0, flat, torch.ones_like(flat))


def _check_probs(probs: Tensor, name: str = "probs") -> None:
    if probs.dim() != 2:
        raise ValueError(f"{name} must have shape (tokens, experts), got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {probs.dtype}")


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest along the last dim, ties to the lower index (as ``jax.lax.top_k``)."""
    values, index = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def sigmoid_top_k(scores: Tensor, k: int, *, selection_bias: Tensor | None = None, dropout: float = 0.0,
                  dropped: str = "zero", allowed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Non-competitive top-k on sigmoid scores (σ-MoE, SwitchHead, DeepSeek-V3): each token takes
    the k experts with the highest ``scores + selection_bias``; the weights are the scores.

    Args:
        scores: (tokens, experts) ``sigmoid(logits)`` (or any scores, e.g. DeepSeek-V2's softmax).
        k: experts per token.
        selection_bias: optional (experts,) added for the choice only (loss-free balancing).
        allowed: optional (tokens, experts) bool mask of the experts a token may choose
            (:func:`group_limited_mask`); it must allow at least k per token.
        dropout: probability of dropping each (token, expert) before the top-k (pass 0 outside
            training).
        dropped: what a dropped pair is: ``"zero"``, its score is 0 in the choice and in the weight
            (σ-MoE's expert dropout); ``"exclude"``, it cannot be chosen unless fewer than k survive,
            and keeps its score as weight (SwitchHead's).

    Returns:
        token, expert, weight: (tokens * k,) each, choice-major; ``weight`` differentiable.
    """
    if dropped not in ("zero", "exclude"):
        raise ValueError(f"dropped must be 'zero' or 'exclude', got {dropped!r}")
    select = scores.detach()
    if dropout > 0:
        drop = torch.rand_like(scores) < dropout
        if dropped == "zero":
            scores = scores.masked_fill(drop, 0.0)
            select = scores.detach()
        else:
            select = select.masked_fill(drop, float("-inf"))
    if selection_bias is not None:
        select = select + selection_bias
    if allowed is not None:
        select = select.masked_fill(~allowed, float("-inf"))
    token, expert, _ = top_k_assign(select, k)
    return token, expert, scores[token, expert]


def group_limited_mask(scores: Tensor, num_groups: int, topk_group: int, *, group_top: int = 2) -> Tensor:
    """Group-limited (node-limited) routing's choice of groups, as DeepSeek-V2/V3: the experts are
    split into ``num_groups`` consecutive groups; each group is scored by the sum of its
    ``group_top`` highest scores (DeepSeek-V3: 2; DeepSeek-V2: 1, the group's maximum) and each
    token may only choose among the experts of its ``topk_group`` best groups.

    Args:
        scores: (tokens, experts) selection scores (DeepSeek-V3: ``sigmoid(logits) + bias``).
        num_groups: groups G; must divide the experts.
        topk_group: groups kept per token, ``1 <= topk_group <= G``.
        group_top: scores summed per group, ``1 <= group_top <= experts / G``.

    Returns:
        (tokens, experts) bool, True for the experts of the kept groups.
    """
    _check_probs(scores, "scores")
    num_tokens, num_experts = scores.shape
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups must divide the {num_experts} experts, got {num_groups}")
    size = num_experts // num_groups
    if not 1 <= topk_group <= num_groups:
        raise ValueError(f"topk_group must be in [1, num_groups={num_groups}], got {topk_group}")
    if not 1 <= group_top <= size:
        raise ValueError(f"group_top must be in [1, experts per group={size}], got {group_top}")
    group_scores = scores.view(num_tokens, num_groups, size).topk(group_top, dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, topk_group, dim=-1).indices
    keep = torch.zeros(num_tokens, num_groups, dtype=torch.bool, device=scores.device).scatter_(1, best, True)
    return keep.unsqueeze(-1).expand(num_tokens, num_groups, size).reshape(num_tokens, num_experts)


class _SparseMixerMultiplier(torch.autograd.Function):
    """SparseMixer's training multiplier: the forward gives ``weight * midpoint`` (midpoint 1 or 1/3,
    Heun's third-order method); the backward gives the scores the gradient of the chosen expert's
    softmax weight, ``weight * (onehot(chosen) - probs) * grad``, whatever the midpoint (GRIN, eq. 8)."""

    @staticmethod
    def forward(ctx, scores: Tensor, weight: Tensor, chosen: Tensor, probs: Tensor, midpoint: Tensor) -> Tensor:
        ctx.save_for_backward(weight, chosen, probs)
        return weight * midpoint

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, chosen, probs = ctx.saved_tensors
        grad = grad * weight
        grad_scores = probs * grad.mul(-1)
        grad_scores.scatter_add_(dim=-1, index=chosen, src=grad)
        return grad_scores, None, None, None, None


def _sparse_mixer_choice(scores: Tensor, candidates: Tensor, jitter_eps: float, training: bool,
                         redraw: bool) -> tuple[Tensor, Tensor]:
    """One SparseMixer choice among ``candidates`` (``scores`` with the experts already chosen at
    -inf): the experts within a relative ``2 * jitter_eps`` of the best candidate stay; at evaluation
    the best is chosen, in training one is sampled (Gumbel-max) among those that stay. Returns the
    (tokens, 1) weight (the chosen expert's softmax over those that stay) and (tokens, 1) index."""
    with torch.no_grad():
        best, best_index = candidates.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=best)
        outside = ((best - scores) / factor) > (2 * jitter_eps)
    gates = candidates.masked_fill(outside, float("-inf"))
    if training:
        chosen = (gates - torch.empty_like(gates).exponential_().log()).max(dim=-1)[1].unsqueeze(-1)
    else:
        chosen = best_index
    probs = torch.softmax(gates, dim=-1)
    weight = probs.gather(dim=-1, index=chosen)
    if not training:
        return weight, chosen
    top = probs.max(dim=-1, keepdim=True)[1]
    draw = torch.rand_like(weight)
    if redraw:  # PhiMoE draws twice for the second expert (rand_like, then uniform_): the same stream
        draw = draw.uniform_()
    midpoint = torch.add(0.3333, torch.logical_or(chosen == top, draw > 0.75), alpha=0.6667).type_as(probs)
    return _SparseMixerMultiplier.apply(scores, weight, chosen, probs, midpoint), chosen


def sparse_mixer(logits: Tensor, jitter_eps: float, training: bool) -> tuple[Tensor, Tensor]:
    """SparseMixer-v2 top-2 gating (GRIN, Liu et al. 2024, arXiv 2409.12136), as PhiMoE's
    ``sparsemixer`` in transformers.

    The first expert is the best logit (sampled in training); the second the best once the first
    is removed. Each weight is the softmax over the logits within a relative ``2 * jitter_eps`` of
    that choice's best (the relative gap measured against ``max(|logit|, best)``); so the weights
    neither sum to 1 nor are renormalised, and with a small ``jitter_eps`` they are mostly 1. In
    training each choice is sampled with Gumbel-max among the logits that stay, its forward weight
    is scaled by a Heun third-order midpoint (1, or 1/3 with probability 1/4 when the sample is not
    the best) and its backward is the straight softmax gradient (:class:`_SparseMixerMultiplier`).
    The random draws come in the same order as transformers', so a seeded run gives the same result.

    Args:
        logits: (tokens, experts) router logits.
        jitter_eps: the relative threshold ε (PhiMoE's ``router_jitter_noise``; used at evaluation too).
        training: sample the choices and use the training multiplier.

    Returns:
        weight: (tokens, 2) combine weights (differentiable); index: (tokens, 2) experts, first choice first.
    """
    _check_probs(logits, "logits")
    if logits.shape[1] < 2:
        raise ValueError(f"sparse_mixer chooses 2 experts, got logits for {logits.shape[1]}")
    first_weight, first = _sparse_mixer_choice(logits, logits, jitter_eps, training, redraw=False)
    rest = torch.scatter(logits, -1, first, float("-inf"))
    second_weight, second = _sparse_mixer_choice(logits, rest, jitter_eps, training, redraw=True)
    return torch.cat((first_weight, second_weight), dim=-1), torch.cat((first, second), dim=-1)


def _rank_within_key(key: Tensor, num_keys: int) -> Tensor:
    """For a sequence of integer keys (A,), the number of earlier entries with the same key."""
    order = torch.sort(key, stable=True).indices
    counts = bincount(key, num_keys)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(key.numel(), device=key.device) - starts[key[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def top_k_assign(
    probs: Tensor,
    k: int,
    capacity: int | None = None,
    batch_priority: bool | Tensor = False,
    *,
    keep: Tensor | None = None,
    group_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Token-choice top-k assignment with optional expert capacity.

    Args:
        probs: (tokens, experts) routing probabilities (any scores; higher is preferred).
        k: experts chosen per token, ``1 <= k <= experts``.
        capacity: buffer places per expert (per group); assignments beyond it are dropped.
            ``None`` keeps every assignment.
        batch_priority: ``False`` fills buffers in token order; ``True`` orders tokens by their
            largest probability, highest first (V-MoE's Batch Prioritized Routing); a (tokens,)
            tensor gives the priority scores directly (highest first).
        keep: optional (tokens, k) bool mask; a ``False`` choice is not dispatched and takes no
            buffer place (GShard's random routing of the second expert).
        group_size: route independent groups of this many consecutive tokens (V-MoE routes per
            group of images); capacity and priority apply within each group. ``tokens`` must be a
            multiple of it. ``None``: one group.

    Returns:
        token, expert, weight: (A,) each. Choice-major order: every token's first choice, then
        every token's second choice, and so on. ``weight`` is ``probs[token, expert]`` itself
        (differentiable), not renormalised.
    """
    _check_probs(probs)
    num_tokens, num_experts = probs.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got k={k}")
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity must be >= 1 or None, got {capacity}")
    group = num_tokens if group_size is None else group_size
    if group < 1 or num_tokens % group != 0:
        raise ValueError(f"group_size must divide the number of tokens ({num_tokens}), got {group_size}")
    if keep is not None and keep.shape != (num_tokens, k):
        raise ValueError(f"keep must have shape (tokens, k)=({num_tokens}, {k}), got {tuple(keep.shape)}")

    values, index = top_k(probs, k)  # (T, k)
    device = probs.device
    token = torch.arange(num_tokens, device=device).unsqueeze(1).expand(num_tokens, k)
    kept = torch.ones(num_tokens, k, dtype=torch.bool, device=device) if keep is None else keep.bool()

    if capacity is not None:
        num_groups = num_tokens // group
        # Order of buffer claims inside each group: position order, or by priority score.
        if isinstance(batch_priority, Tensor):
            if batch_priority.shape != (num_tokens,):
                raise ValueError(
                    f"batch_priority scores must have shape (tokens,)=({num_tokens},), "
                    f"got {tuple(batch_priority.shape)}"
                )
            scores = batch_priority.detach()
        elif batch_priority:
            scores = values[:, 0].detach()
        else:
            scores = None
        local = torch.arange(group, device=device).expand(num_groups, group)
        if scores is not None:
            local = torch.sort(scores.view(num_groups, group), dim=1, descending=True, stable=True).indices
        order = (local + torch.arange(num_groups, device=device).unsqueeze(1) * group)  # (G, S) token ids
        # Claim sequence per group is choice-major: (G, k, S).
        seq_token = order.unsqueeze(1).expand(num_groups, k, group)
        seq_choice = torch.arange(k, device=device).view(1, k, 1).expand_as(seq_token)
        seq_expert = index[seq_token, seq_choice]
        seq_kept = kept[seq_token, seq_choice]
        group_id = torch.arange(num_groups, device=device).view(-1, 1, 1).expand_as(seq_token)
        # A choice that is not dispatched gets its own key so it takes no buffer place.
        key = torch.where(seq_kept, group_id * num_experts + seq_expert, num_groups * num_experts)
        rank = _rank_within_key(key.reshape(-1), num_groups * num_experts + 1).view_as(key)
        within = seq_kept & (rank < capacity)
        kept = torch.zeros_like(kept)
        kept[seq_token, seq_choice] = within

    # Choice-major flat order: (k, T).
    if capacity is None and keep is None:  # every choice kept: no data-dependent shape (no host sync)
        return token.t().reshape(-1), index.t().reshape(-1), values.t().reshape(-1)
    mask = kept.t().reshape(-1)
    return (
        token.t().reshape(-1)[mask],
        index.t().reshape(-1)[mask],
        values.t().reshape(-1)[mask],
    )


def expert_choice_assign(probs: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Expert-choice assignment: every expert takes its ``capacity`` highest-probability tokens.

    Args:
        probs: (tokens, experts) routing probabilities.
        capacity: tokens per expert, ``1 <= capacity <= tokens``.

    Returns:
        token, expert, weight: (experts * capacity,) each, expert-major; weight = probs[token, expert].
    """
    _check_probs(probs)
    num_tokens, num_experts = probs.shape
    if not 1 <= capacity <= num_tokens:
        raise ValueError(f"capacity must be in [1, tokens={num_tokens}], got {capacity}")
    values, index = top_k(probs.t(), capacity)  # (E, C)
    expert = torch.arange(num_experts, device=probs.device).repeat_interleave(capacity)
    return index.reshape(-1), expert, values.reshape(-1)


def sinkhorn(logits: Tensor, num_iters: int = 100, tol: float = 1e-4) -> Tensor:
    """Balance ``exp(logits)`` so rows sum to ``1/tokens`` and columns to ``1/experts``.

    Alternating row and column scaling (Sinkhorn-Knopp) in log space, stopped after ``num_iters``
    or when the column marginals change by less than ``tol`` (relative, mean absolute).

    Args:
        logits: (tokens, experts).

    Returns:
        (tokens, experts) non-negative transport plan; the columns sum exactly to ``1/experts``
        and the rows approximately to ``1/tokens``.
    """
    _check_probs(logits, "logits")
    num_tokens, num_experts = logits.shape
    log_p = logits.float()
    log_row = -math.log(num_tokens)
    log_col = -math.log(num_experts)
    u = torch.zeros(num_tokens, 1, device=logits.device)
    v = torch.zeros(1, num_experts, device=logits.device)
    for _ in range(num_iters):
        u = log_row - torch.logsumexp(log_p + v, dim=1, keepdim=True)
        v_new = log_col - torch.logsumexp(log_p + u, dim=0, keepdim=True)
        change = (v_new.exp() - v.exp()).abs().mean() * num_experts
        v = v_new
        if change < tol:
            break
    return torch.exp(log_p + u + v)


def balanced_assignment(scores: Tensor, capacity: int | None = None) -> Tensor:
    """Assign each token one expert, at most ``capacity`` tokens per expert, maximising the total score.

    The balanced linear assignment of BASE layers (Lewis et al. 2021), solved exactly: every expert
    offers ``capacity`` identical places and :func:`scipy.optimize.linear_sum_assignment` (the
    Jonker-Volgenant algorithm) matches tokens to places. It runs on the CPU (a device tensor is
    copied to the host); its cost grows about cubically with the tokens, fine for the thousands of
    tokens of a routing group. (BASE's own code uses an auction algorithm in C++; an auction in
    Python was measured 40-100x slower than this here.)

    Args:
        scores: (tokens, experts) finite affinities.
        capacity: places per expert; default ``ceil(tokens / experts)`` (balanced).

    Returns:
        (tokens,) int64 expert index per token, on the device of ``scores``.
    """
    from scipy.optimize import linear_sum_assignment

    _check_probs(scores, "scores")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("balanced_assignment: scores hold NaN or inf")
    num_tokens, num_experts = scores.shape
    capacity = math.ceil(num_tokens / num_experts) if capacity is None else capacity
    if capacity < 1 or capacity * num_experts < num_tokens:
        raise ValueError(
            f"capacity={capacity} x experts={num_experts} cannot hold tokens={num_tokens}"
        )
    places = scores.detach().double().cpu().numpy().repeat(capacity, axis=1)  # (T, E * capacity)
    rows, columns = linear_sum_assignment(places, maximize=True)
    assigned = torch.empty(num_tokens, dtype=torch.long)
    assigned[torch.from_numpy(rows)] = torch.from_numpy(columns // capacity)
    return assigned.to(scores.device)


def _l2_normalize(t: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    return t * torch.rsqrt(t.pow(2).sum(dim=dim, keepdim=True) + eps)


def soft_moe_weights(x: Tensor, mu: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Soft MoE dispatch and combine weights (Puigcerver et al. 2023), as vmoe's ``SoftRouter``.

    Tokens and slot parameters are L2-normalised over ``dim``; the learned ``scale`` multiplies
    whichever of the two normalised tensors is smaller; logits are their dot products.

    Args:
        x: (groups, tokens, dim) token representations.
        mu: (dim, experts, slots) slot parameters.
        scale: 0-dim learnable scale.

    Returns:
        dispatch: (groups, tokens, experts, slots), softmax over tokens (each slot is a convex
            combination of tokens).
        combine: (groups, tokens, experts, slots), softmax over all experts x slots (each token is
            a convex combination of slot outputs).
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (groups, tokens, dim), got shape {tuple(x.shape)}")
    if mu.dim() != 3 or mu.shape[0] != x.shape[-1]:
        raise ValueError(
            f"mu must have shape (dim={x.shape[-1]}, experts, slots), got shape {tuple(mu.shape)}"
        )
    if scale.dim() != 0:
        raise ValueError(f"scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")
    x_n = _l2_normalize(x.float(), dim=-1)
    mu_n = _l2_normalize(mu.float(), dim=0)
    # The reference compares whole-array sizes (groups included); on a tie mu is scaled.
    if x_n.numel() < mu_n.numel():
        x_n = x_n * scale
    else:
        mu_n = mu_n * scale
    logits = torch.einsum("gmd,dnp->gmnp", x_n, mu_n)
    dispatch = torch.softmax(logits, dim=1)
    groups, tokens, experts, slots = logits.shape
    combine = torch.softmax(logits.reshape(groups, tokens, experts * slots), dim=-1)
    return dispatch, combine.view(groups, tokens, experts, slots)

