"""Forecast evaluation: the paper's MSE/MAE protocol on benchmark CSVs, and zero-shot MASE against a
seasonal-naive forecast on the built-in real series (the headline of the tiny zoo entry's card)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from moezoo.modalities.timeseries.data import ForecastWindows, load_real_series, read_csv_splits
from moezoo.modalities.timeseries.model import TimeMoE

__all__ = [
    "PAPER_CONTEXT_LENGTHS",
    "evaluate_csv",
    "evaluate_zero_shot",
    "mase_scale",
    "seasonal_naive",
]

#: run_eval.py's context length for each benchmark horizon (others: 4 x horizon).
PAPER_CONTEXT_LENGTHS = {96: 512, 192: 1024, 336: 2048, 720: 3072}


def seasonal_naive(context: Tensor, season: int, horizon: int) -> Tensor:
    """Repeat the last ``season`` points: (batch, length) -> (batch, horizon)."""
    if context.shape[-1] < season:
        raise ValueError(f"seasonal_naive: context of {context.shape[-1]} points is shorter than season={season}")
    last = context[..., -season:]
    reps = math.ceil(horizon / season)
    return last.repeat(*([1] * (last.dim() - 1)), reps)[..., :horizon]


def mase_scale(context: Tensor, season: int) -> Tensor:
    """MASE denominator: mean absolute seasonal difference ``|y_t - y_{t-m}|`` over the context: (batch,)."""
    return (context[..., season:] - context[..., :-season]).abs().mean(dim=-1)


@torch.no_grad()
def evaluate_zero_shot(model: TimeMoE, context_length: int = 512, test_fraction: float = 0.2,
                       series: Sequence | None = None) -> dict[str, float]:
    """Zero-shot MASE of ``model`` and of the seasonal-naive forecast on the built-in real series.

    For each series (:func:`~moezoo.modalities.timeseries.data.load_real_series`): forecast origins
    every ``horizon`` points over its last ``test_fraction``; the model sees the ``context_length``
    points before each origin, z-scored per window (``forecast(normalize=True)``); both forecasts
    are scored by MASE with the seasonal-naive in-context error as the scale.

    Returns:
        ``mase`` and ``seasonal_naive_mase``: means over series of the per-series mean MASE;
        ``relative_mase``: geometric mean over series of their ratio (< 1: the model is better);
        per series ``mase/<name>``, ``seasonal_naive_mase/<name>``; ``examples``: forecast windows.
    """
    model.eval()
    device = next(model.parameters()).device
    result: dict[str, float] = {}
    ratios, model_scores, naive_scores, windows = [], [], [], 0
    for s in series or load_real_series():
        values = torch.tensor(s.values, dtype=torch.float32)
        start = len(values) - math.ceil(test_fraction * len(values))
        origins = list(range(max(start, context_length), len(values) - s.horizon + 1, s.horizon))
        if not origins:
            raise ValueError(f"{s.name}: {len(values)} points leave no test window for context {context_length}")
        context = torch.stack([values[o - context_length : o] for o in origins])
        target = torch.stack([values[o : o + s.horizon] for o in origins])
        scale = mase_scale(context, s.season)
        forecast = model.forecast(context.to(device), s.horizon, normalize=True).float().cpu()
        ours = ((forecast - target).abs().mean(-1) / scale).mean().item()
        naive = ((seasonal_naive(context, s.season, s.horizon) - target).abs().mean(-1) / scale).mean().item()
        result[f"mase/{s.name}"], result[f"seasonal_naive_mase/{s.name}"] = ours, naive
        model_scores.append(ours)
        naive_scores.append(naive)
        ratios.append(ours / naive)
        windows += len(origins)
    result["mase"] = float(np.mean(model_scores))
    result["seasonal_naive_mase"] = float(np.mean(naive_scores))
    result["relative_mase"] = float(np.exp(np.mean(np.log(ratios))))
    result["examples"] = windows
    return dict(sorted(result.items()))


@torch.no_grad()
def evaluate_csv(
    model: TimeMoE,
    path: str | os.PathLike,
    horizons: Sequence[int] = (96, 192, 336, 720),
    context_lengths: Mapping[int, int] | None = None,
    stride: int = 1,
    batch_size: int = 32,
) -> dict[str, float]:
    """The paper's long-horizon protocol (Time-MoE ``run_eval.py``) on an ETT-layout CSV.

    Every channel is a univariate series; rows are split and scaled as
    :func:`~moezoo.modalities.timeseries.data.read_csv_splits` (scaler fit on train); windows of the
    test rows every ``stride`` points (the paper: 1) are forecast greedily from the scaled values
    (no per-window normalisation) on the model's device and dtype; MSE and MAE are averaged over
    every predicted point.

    Args:
        horizons: forecast lengths (the paper: 96, 192, 336, 720).
        context_lengths: context per horizon; default :data:`PAPER_CONTEXT_LENGTHS` (else 4 x horizon).

    Returns:
        ``mse/<h>``, ``mae/<h>``, ``windows/<h>`` per horizon and ``mse``, ``mae`` averaged over horizons.
    """
    model.eval()
    device = next(model.parameters()).device
    contexts = dict(PAPER_CONTEXT_LENGTHS if context_lengths is None else context_lengths)
    result: dict[str, float] = {}
    for h in horizons:
        c = contexts.get(h, 4 * h)
        test = read_csv_splits(path, c)["test"]
        windows = ForecastWindows(list(test), c, h, stride)
        if len(windows) == 0:
            raise ValueError(f"{path}: no test window for context {c} + horizon {h}")
        sq, ab, count = 0.0, 0.0, 0
        for i in range(0, len(windows), batch_size):
            items = [windows[j] for j in range(i, min(i + batch_size, len(windows)))]
            context = torch.stack([w["context"] for w in items])
            target = torch.stack([w["target"] for w in items])
            err = model.forecast(context.to(device), h).float().cpu() - target
            sq += err.pow(2).sum().item()
            ab += err.abs().sum().item()
            count += err.numel()
        result[f"mse/{h}"], result[f"mae/{h}"], result[f"windows/{h}"] = sq / count, ab / count, len(windows)
    result["mse"] = float(np.mean([result[f"mse/{h}"] for h in horizons]))
    result["mae"] = float(np.mean([result[f"mae/{h}"] for h in horizons]))
    return result
