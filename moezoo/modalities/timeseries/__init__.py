"""Time series: Time-MoE, the forecasting task, series data and forecast evaluation."""

from moezoo.modalities.timeseries.data import (
    ForecastWindows,
    RealSeries,
    SeriesDataModule,
    WindowDataset,
    kernel_synth,
    load_real_series,
    read_csv_splits,
)
from moezoo.modalities.timeseries.evaluate import evaluate_csv, evaluate_zero_shot, seasonal_naive
from moezoo.modalities.timeseries.losses import autoregressive_loss, time_moe_balance_loss
from moezoo.modalities.timeseries.model import TimeMoE, TimeMoELoss
from moezoo.modalities.timeseries.task import Forecasting

__all__ = [
    "ForecastWindows",
    "Forecasting",
    "RealSeries",
    "SeriesDataModule",
    "TimeMoE",
    "TimeMoELoss",
    "WindowDataset",
    "autoregressive_loss",
    "evaluate_csv",
    "evaluate_zero_shot",
    "kernel_synth",
    "load_real_series",
    "read_csv_splits",
    "seasonal_naive",
    "time_moe_balance_loss",
]
