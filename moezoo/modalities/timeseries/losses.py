"""Time-MoE's training objective: Huber loss over every forecasting head, and its balance loss.

Both follow the reference (github Time-MoE/Time-MoE, ``time_moe/models/modeling_time_moe.py``:
``TimeMoeForPrediction.calc_ar_loss`` and ``load_balancing_loss_func``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moezoo.routers import functional as RF
from moezoo.routers.losses import load_balancing_loss

__all__ = ["HUBER_DELTA", "autoregressive_loss", "horizon_targets", "time_moe_balance_loss"]

#: The reference's ``torch.nn.HuberLoss(reduction="none", delta=2.0)``.
HUBER_DELTA = 2.0


def horizon_targets(values: Tensor, horizon: int) -> Tensor:
    """For each position t, the ``horizon`` values ``values[t : t + horizon]``, zero past the end.

    Args:
        values: (batch, length) labels (``labels[t]`` is the point after input t) or a loss mask.

    Returns:
        (batch, length, horizon).
    """
    return F.pad(values, (0, horizon - 1)).unfold(-1, horizon, 1)


def autoregressive_loss(
    predictions: Sequence[Tensor],
    horizons: Sequence[int],
    labels: Tensor,
    loss_mask: Tensor | None = None,
    delta: float = HUBER_DELTA,
) -> Tensor:
    """Mean over heads of each head's Huber loss against the next ``h`` labels.

    Head j predicts, at position t, ``labels[t : t + h_j]``; targets past the window are zeros.
    With ``loss_mask`` the loss is the mask-weighted mean (the padded tail and the targets past
    the window have mask 0); without it, it is the plain mean over every entry, the zero-padded
    targets included, exactly as the reference.

    Args:
        predictions: per head (batch, length, h_j).
        horizons: h_j per head.
        labels: (batch, length).
        loss_mask: (batch, length) 1 where the label is real, 0 for padding; or None.

    Returns:
        0-dim loss.
    """
    if len(predictions) != len(horizons) or not predictions:
        raise ValueError(f"need one prediction per horizon, got {len(predictions)} for horizons {list(horizons)}")
    total = labels.new_zeros(())
    for pred, h in zip(predictions, horizons):
        target = horizon_targets(labels, h)
        if pred.shape != target.shape:
            raise ValueError(f"head of horizon {h}: predictions {tuple(pred.shape)} vs targets {tuple(target.shape)}")
        losses = F.huber_loss(pred, target.to(pred.dtype), reduction="none", delta=delta)
        if loss_mask is None:
            total = total + losses.mean()
        else:
            mask = horizon_targets(loss_mask.to(losses.dtype), h)
            total = total + (losses * mask).sum() / mask.sum()
    return total / len(predictions)


def time_moe_balance_loss(router_logits: Sequence[Tensor], k: int) -> Tensor:
    """Time-MoE's load-balancing loss, computed once over the tokens of **all** layers together.

    ``E * sum_{j<k} sum_e f_{j,e} * P_e`` where, over the concatenated router logits of every
    layer, ``P_e`` is the mean softmax probability of expert e and ``f_{j,e}`` the fraction of
    tokens whose j-th choice is e. It equals k for a uniform router (the reference's scale, k times
    Switch's :func:`~moezoo.routers.losses.load_balancing_loss`); it is not a mean of per-layer losses.

    Args:
        router_logits: per layer (tokens, experts) raw router logits.
        k: experts per token.
    """
    if not router_logits:
        raise ValueError("time_moe_balance_loss needs the router logits of at least one layer")
    logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = RF.top_k(probs, k)[1]
    return k * load_balancing_loss(probs, chosen)
