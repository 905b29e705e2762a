"""Group-limited (device- or node-limited) routing: DeepSeek-V2 and DeepSeek-V3."""

from __future__ import annotations

import torch
from torch import Tensor

from moezoo.checks import require_int
from moezoo.routers import functional as RF
from moezoo.routers import losses as L
from moezoo.routers.sigmoid import SigmoidRouter

__all__ = ["GroupLimitedRouter"]

_SCORES = ("sigmoid", "softmax")


class GroupLimitedRouter(SigmoidRouter):
    """Top-k routing restricted to each token's best groups of experts.

    The E experts form ``num_groups`` consecutive groups (the devices of DeepSeek-V2, the nodes of
    DeepSeek-V3). A group is scored by the sum of its ``group_top`` highest selection scores; each
    token keeps its ``topk_group`` best groups and picks its k experts among theirs
    (:func:`~moezoo.routers.functional.group_limited_mask`), so its assignments reach at most
    ``topk_group`` devices. The rest is :class:`SigmoidRouter`: selection by ``score + bias`` with
    the loss-free balancing ``bias`` (never in the weights) and its once-per-step update, weights =
    the chosen scores, optionally renormalised, then times ``scale``.

    - DeepSeek-V3: ``scores="sigmoid"``, ``group_top=2``, ``normalize=True``,
      ``normalize_eps=1e-20``, ``scale=routed_scaling_factor``; ``bias`` is its
      ``e_score_correction_bias``.
    - DeepSeek-V2 (``group_limited_greedy``): ``scores="softmax"`` over all experts, ``group_top=1``
      (a group's best score), no renormalisation, ``scale=routed_scaling_factor``, no bias.

    Args:
        dim: input feature size.
        num_experts: E, a multiple of ``num_groups``.
        k: experts per token, at most ``topk_group * E / num_groups``.
        num_groups: G.
        topk_group: groups each token may use.
        group_top: scores summed per group (<= E / G).
        scores: "sigmoid" or "softmax" of the logits.
        device_balance: add DeepSeek-V2's device-level balance loss over the groups as devices.
        normalize, normalize_eps, scale, bias_update_rate, sequence_length, check_finite: as
            :class:`SigmoidRouter`.

    Losses: those of :class:`SigmoidRouter`; with ``device_balance``, ``device_balance``
    (:func:`~moezoo.routers.losses.device_balance_loss` of the normalised scores, the softmax itself
    for ``scores="softmax"``, with the G groups as the devices).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 8, *, num_groups: int = 8, topk_group: int = 4,
                 group_top: int = 2, scores: str = "sigmoid", normalize: bool = False, normalize_eps: float = 0.0,
                 scale: float = 1.0, bias_update_rate: float = 0.0, sequence_length: int | None = None,
                 device_balance: bool = False, check_finite: bool = True) -> None:
        super().__init__(dim, num_experts, k, normalize=normalize, normalize_eps=normalize_eps, scale=scale,
                         bias_update_rate=bias_update_rate, sequence_length=sequence_length,
                         check_finite=check_finite)
        name = type(self).__name__
        self.num_groups = require_int(name, "num_groups", num_groups)
        if num_experts % num_groups:
            raise ValueError(f"{name}: num_groups must divide num_experts={num_experts}, got num_groups={num_groups}")
        size = num_experts // num_groups
        self.topk_group = require_int(name, "topk_group", topk_group)
        if topk_group > num_groups:
            raise ValueError(f"{name}: topk_group must be <= num_groups={num_groups}, got topk_group={topk_group}")
        self.group_top = require_int(name, "group_top", group_top)
        if group_top > size:
            raise ValueError(f"{name}: group_top must be <= the {size} experts of a group, got group_top={group_top}")
        if self.k > topk_group * size:
            raise ValueError(
                f"{name}: k must be <= topk_group x experts per group = {topk_group * size} (the experts a token "
                f"may choose), got k={k}"
            )
        if scores not in _SCORES:
            raise ValueError(f"{name}: scores must be one of {_SCORES}, got {scores!r}")
        self.score_function = scores
        self.device_balance = bool(device_balance)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_groups={self.num_groups}, topk_group={self.topk_group}, "
                f"group_top={self.group_top}, scores={self.score_function}")

    def scores(self, logits: Tensor) -> Tensor:
        """(tokens, experts) sigmoid or softmax (over all experts) of the fp32 logits."""
        return torch.sigmoid(logits) if self.score_function == "sigmoid" else torch.softmax(logits, dim=-1)

    def allowed(self, select: Tensor) -> Tensor:
        """The experts of each token's ``topk_group`` best groups, scored on ``select``."""
        return RF.group_limited_mask(select, self.num_groups, self.topk_group, group_top=self.group_top)

    def extra_losses(self, share: Tensor, chosen: Tensor) -> dict[str, Tensor]:
        """``device_balance`` over the groups when asked for."""
        if not self.device_balance:
            return {}
        return {"device_balance": L.device_balance_loss(share, chosen, self.num_groups)}
