"""Sigmoid-score routing (σ-MoE, DeepSeek-V3) with optional auxiliary-loss-free balancing."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moezoo.checks import require_float, require_int
from moezoo.routers import functional as RF
from moezoo.routers import losses as L
from moezoo.routers.base import Router
from moezoo.routers.routing import Routing

__all__ = ["SigmoidRouter"]


class SigmoidRouter(Router):
    """Each token picks the k experts with the highest ``sigmoid(logit) + bias``; its weights are
    the sigmoid scores themselves (``normalize``: rescaled to sum to 1, as DeepSeek-V3).

    Auxiliary-loss-free balancing (Wang et al. 2024, arXiv 2408.15664): the per-expert ``bias``
    (a buffer, used only for selection, never in the weights) is updated once per optimiser step
    (:meth:`update_after_step`) by ``bias += bias_update_rate * sign(mean load - load_e)``, the
    loads counted over every training forward since the last step (micro-batches of gradient
    accumulation included) and summed over all ranks, so every rank holds the same bias and an
    overloaded expert becomes less attractive. ``bias_update_rate=0`` disables it.

    Args:
        dim: input feature size.
        num_experts: E.
        k: experts per token.
        normalize: rescale each token's k weights to sum to 1.
        normalize_eps: added to the sum the weights are divided by (DeepSeek-V3: 1e-20).
        scale: multiply every combine weight by this, after ``normalize`` (DeepSeek-V3's
            ``routed_scaling_factor``).
        bias_update_rate: u of the loss-free balancing (paper: 1e-3).
        sequence_length: T of the sequences the tokens form, for the ``sequence_balance`` loss: the
            routed tokens are consecutive sequences of T tokens (a (batch, T, dim) input flattened
            batch-major, as :class:`~moezoo.layers.MoE` does), so their count must be a multiple of
            T. None: no sequence loss.

    Losses: ``load_balancing`` on the scores normalised over experts (over all routed tokens),
    ``z_loss``; with ``sequence_length``, ``sequence_balance`` (DeepSeek-V3's complementary
    sequence-wise balance loss, :func:`~moezoo.routers.losses.sequence_balance_loss`, on the same
    normalised scores). Both count the experts actually chosen (with the balancing bias and, for
    :class:`~moezoo.routers.group_limited.GroupLimitedRouter`, the group limit), as Megatron's
    routing map does; the paper's eq. 18 writes the indicator on the top-k of the raw scores.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 2, *, normalize: bool = False, normalize_eps: float = 0.0,
                 scale: float = 1.0, bias_update_rate: float = 0.0, sequence_length: int | None = None,
                 check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, check_finite=check_finite)
        name = type(self).__name__
        self.sequence_length = None if sequence_length is None else require_int(name, "sequence_length",
                                                                                  sequence_length)
        self.normalize = bool(normalize)
        self.normalize_eps = require_float(name, "normalize_eps", normalize_eps)
        self.scale = require_float(name, "scale", scale, strict=True)
        self.bias_update_rate = require_float(name, "bias_update_rate", bias_update_rate)
        self.register_buffer("bias", torch.zeros(num_experts))
        # A plain attribute, not a buffer: DDP broadcasts buffers from rank 0 before each forward,
        # which would overwrite the other ranks' counts. It is zero at every step boundary, which is
        # where checkpoints are taken.
        self.pending_load: Tensor | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias_update_rate={self.bias_update_rate}"

    @torch.no_grad()
    def update_after_step(self) -> None:
        """One loss-free balancing step from the loads since the last one, summed over all ranks
        (every rank calls this at the same optimiser step); then the counts restart."""
        if self.bias_update_rate == 0:
            return
        load = self.pending_load if self.pending_load is not None else self.bias.new_zeros(self.num_experts)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if load.sum() > 0:  # no training forward since the last step on any rank: nothing to balance
            self.bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.pending_load = None

    def scores(self, logits: Tensor) -> Tensor:
        """(tokens, experts) routing scores from the fp32 logits: their sigmoid."""
        return torch.sigmoid(logits)

    def allowed(self, select: Tensor) -> Tensor | None:
        """(tokens, experts) bool mask of the experts each token may choose, from the selection
        scores (scores + bias); None: all of them."""
        return None

    def extra_losses(self, share: Tensor, chosen: Tensor) -> dict[str, Tensor]:
        """Further losses of a subclass from the (tokens, experts) normalised scores and the
        (tokens, k) chosen experts. Default: none."""
        return {}

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        logits = self.compute_logits(x)
        num_tokens, num_experts = logits.shape
        scores = self.scores(logits)
        allowed = self.allowed(scores.detach() + self.bias)
        token, expert, weight = RF.sigmoid_top_k(scores, self.k, selection_bias=self.bias, allowed=allowed)
        if self.normalize:
            total = torch.zeros(num_tokens, device=x.device).index_add(0, token, weight)
            weight = weight / (total[token] + self.normalize_eps)
        if self.scale != 1.0:
            weight = weight * self.scale
        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                load = RF.bincount(expert, num_experts).float()
                self.pending_load = load if self.pending_load is None else self.pending_load + load
        share = scores / scores.sum(dim=-1, keepdim=True)
        chosen = expert.view(self.k, num_tokens).t()
        losses = {"load_balancing": L.load_balancing_loss(share, chosen), "z_loss": L.z_loss(logits)}
        if self.sequence_length is not None:
            length = self.sequence_length
            if num_tokens % length:
                raise ValueError(f"{type(self).__name__}: the {num_tokens} routed tokens are not whole sequences of "
                                 f"sequence_length={length}")
            losses["sequence_balance"] = L.sequence_balance_loss(share.view(-1, length, num_experts),
                                                                 chosen.reshape(-1, length, self.k))
        losses.update(self.extra_losses(share, chosen))
        return self.finish(token, expert, weight, num_tokens, logits=logits, probs=share, losses=losses)
