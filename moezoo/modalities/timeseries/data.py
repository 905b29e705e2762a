"""Series data: a KernelSynth-style synthetic corpus, built-in real series, ETT-layout CSV files.

- :func:`kernel_synth`: Gaussian-process samples from random compositions of a kernel bank (trends,
  seasonalities, smooth and rough variation, noise), in the style of Chronos' KernelSynth (Ansari et
  al. 2024), generated deterministically from a seed; no download.
- :func:`load_real_series`: real univariate series that ship inside pip packages (pmdarima's Taylor
  electricity demand and monthly sunspots, statsmodels' Mauna Loa CO2 and El Nino SST), for
  zero-shot evaluation; the model never trains on them.
- :func:`read_csv_splits`: a CSV in the ETT / long-horizon benchmark layout (a ``date`` column,
  then one column per channel), split and scaled exactly as Time-MoE's ``BenchmarkEvalDataset``.
- :class:`WindowDataset`: training windows as Time-MoE's ``TimeMoEWindowDataset``;
  :class:`ForecastWindows`: (context, target) pairs for forecasting evaluation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from moezoo.checks import import_extra, require_int
from moezoo.data import SplitDataModule

__all__ = [
    "BUILTIN_PREFIX",
    "ForecastWindows",
    "RealSeries",
    "SeriesDataModule",
    "WindowDataset",
    "csv_borders",
    "SyntheticCorpus",
    "kernel_synth",
    "load_real_series",
    "read_csv_splits",
    "zero_scale",
]


# -- synthetic corpus ---------------------------------------------------------------------------

#: Periods (in steps) of the periodic kernels: KernelSynth's list (hourly, daily, weekly, monthly,
#: yearly cycles at common sampling rates).
PERIODS = (24, 48, 96, 168, 336, 672, 7, 14, 30, 60, 365, 730, 4, 26, 52, 6, 12, 40, 10)


def _kernel_bank_names() -> list[str]:
    """The kernels of :func:`_kernel_bank`, in its order."""
    return (["constant"] + [f"white_noise({n})" for n in (0.1, 1.0)] + [f"linear({s})" for s in (0.0, 1.0, 10.0)]
            + [f"rbf({s})" for s in (0.1, 1.0, 10.0)] + [f"rational_quadratic({a})" for a in (0.1, 1.0, 10.0)]
            + [f"periodic({p})" for p in PERIODS])


def _kernel_bank(length: int) -> list[np.ndarray]:
    """The (length, length) covariance matrices of KernelSynth's kernel bank on t in [0, 1]."""
    t = np.linspace(0.0, 1.0, length)
    d = np.abs(t[:, None] - t[None, :])
    bank = [np.ones((length, length))]  # constant
    bank += [noise * np.eye(length) for noise in (0.1, 1.0)]  # white noise
    bank += [sigma0**2 + np.outer(t, t) for sigma0 in (0.0, 1.0, 10.0)]  # linear (dot product): trends
    bank += [np.exp(-(d**2) / (2 * scale**2)) for scale in (0.1, 1.0, 10.0)]  # RBF: smooth variation
    bank += [(1 + d**2 / (2 * alpha)) ** -alpha for alpha in (0.1, 1.0, 10.0)]  # rational quadratic
    bank += [np.exp(-2 * np.sin(np.pi * d / (p / length)) ** 2) for p in PERIODS]  # seasonalities
    return bank


def _sample_gp(cov: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The draw of N(0, cov) for the standard normal ``z``; Cholesky with a small jitter,
    eigen-decomposition if that fails."""
    jitter = 1e-6 * max(float(np.mean(np.diag(cov))), 1e-12)
    try:
        return np.linalg.cholesky(cov + jitter * np.eye(cov.shape[0])) @ z
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(cov)
        return vectors @ (np.sqrt(np.clip(values, 0.0, None)) * z)


class SyntheticCorpus(Sequence[np.ndarray]):
    """KernelSynth-style synthetic series, generated on first access.

    For each series: draw j ~ U{1..max_kernels} kernels with replacement from the bank (constant,
    white noise, linear, RBF, rational quadratic, periodic with the :data:`PERIODS`), combine them
    left to right with + or * chosen at random, and draw one sample of the zero-mean GP prior.

    The corpus is a function of the seed: one pass over the random stream (cheap: the kernel
    choices, the operators and each series' normal draws, in the order of a series-by-series
    generation) fixes every series, and series i's Gaussian-process sample (a Cholesky factorisation
    of a length x length covariance, the whole cost) is computed when ``corpus[i]`` is first read,
    then kept. A training run that reads a few series (``fast_dev_run``) pays for those alone.

    Args:
        num_series: number of series.
        length: points per series.
        seed: the whole corpus is a function of it.
        max_kernels: most kernels in one composition (KernelSynth: 5).

    ``corpus[i]``: (length,) float32, z-scored (:func:`zero_scale`).
    """

    def __init__(self, num_series: int, length: int = 512, seed: int = 0, max_kernels: int = 5) -> None:
        for name, value in (("num_series", num_series), ("length", length), ("max_kernels", max_kernels)):
            require_int("kernel_synth", name, value)
        self.length = length
        bank_size = len(_kernel_bank_names())
        rng = np.random.default_rng(seed)
        self._recipes: list[tuple[np.ndarray, list[bool], np.ndarray]] = []
        for _ in range(num_series):
            chosen = rng.integers(0, bank_size, size=rng.integers(1, max_kernels + 1))
            adds = [bool(rng.random() < 0.5) for _ in chosen[1:]]
            self._recipes.append((chosen, adds, rng.standard_normal(length)))
        self._series: dict[int, np.ndarray] = {}
        self._bank: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._recipes)

    def __getitem__(self, index: int) -> np.ndarray:
        index = range(len(self))[index]
        if index not in self._series:
            if self._bank is None:
                self._bank = _kernel_bank(self.length)
            chosen, adds, z = self._recipes[index]
            cov = self._bank[chosen[0]].copy()
            for c, add in zip(chosen[1:], adds):
                cov = cov + self._bank[c] if add else cov * self._bank[c]
            self._series[index] = zero_scale(_sample_gp(cov, z)).astype(np.float32)
        return self._series[index]


def kernel_synth(num_series: int, length: int = 512, seed: int = 0, max_kernels: int = 5) -> np.ndarray:
    """The whole :class:`SyntheticCorpus` at once: (num_series, length) float32."""
    corpus = SyntheticCorpus(num_series, length, seed, max_kernels)
    return np.stack([corpus[i] for i in range(num_series)])


def zero_scale(series: np.ndarray) -> np.ndarray:
    """Time-MoE's ``zero_scaler``: subtract the mean and divide by the (population) std unless it is 0."""
    series = np.asarray(series)
    std = series.std()
    centred = series - series.mean()
    return (centred / std if std != 0 else centred).astype(series.dtype)


# -- real series --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RealSeries:
    """A built-in real series and its evaluation settings.

    Attributes:
        name: short name.
        values: (length,) float64 values (missing points linearly interpolated).
        season: seasonal period m of the seasonal-naive baseline and the MASE scale.
        horizon: forecast length used in the zero-shot evaluation.
        description: what and where from.
    """

    name: str
    values: np.ndarray
    season: int
    horizon: int
    description: str


@functools.lru_cache(maxsize=1)
def load_real_series() -> tuple[RealSeries, ...]:
    """Four real series shipped by pip packages (``pmdarima``, ``statsmodels``), no download:

    - ``taylor``: half-hourly electricity demand, England and Wales 2000 (4,032; m = 48, h = 48);
    - ``co2``: weekly Mauna Loa CO2 1958-2001 (2,284, 59 gaps interpolated; m = 52, h = 52);
    - ``sunspots``: monthly sunspot numbers 1749-1983 (2,820; m = 12, h = 24);
    - ``elnino``: monthly El Nino sea-surface temperature 1950-2010 (732; m = 12, h = 12).
    """
    pm = import_extra("pmdarima.datasets", "timeseries")
    statsmodels_datasets = import_extra("statsmodels.datasets", "timeseries")
    co2, elnino = statsmodels_datasets.co2, statsmodels_datasets.elnino
    co2_values = co2.load_pandas().data["co2"].interpolate(limit_direction="both").to_numpy(dtype=np.float64)
    nino = elnino.load_pandas().data.drop(columns="YEAR").to_numpy(dtype=np.float64).reshape(-1)
    return (
        RealSeries("taylor", np.asarray(pm.load_taylor(), dtype=np.float64), 48, 48,
                   "half-hourly electricity demand, England and Wales, June-August 2000 (pmdarima)"),
        RealSeries("co2", co2_values, 52, 52, "weekly atmospheric CO2 at Mauna Loa, 1958-2001 (statsmodels)"),
        RealSeries("sunspots", np.asarray(pm.load_sunspots(), dtype=np.float64), 12, 24,
                   "monthly mean sunspot numbers, 1749-1983 (pmdarima)"),
        RealSeries("elnino", nino, 12, 12, "monthly El Nino sea-surface temperature, 1950-2010 (statsmodels)"),
    )


# -- CSV in the benchmark layout ----------------------------------------------------------------

def csv_borders(name: str, num_rows: int, context_length: int) -> tuple[list[int], list[int]]:
    """Split starts and ends (train, val, test) as Time-MoE's ``BenchmarkEvalDataset``: ETTh files
    12/4/4 months of hours, ETTm files the same in 15-minute steps, any other 70/10/20; val and
    test start ``context_length`` rows early so their first window has a full context (val no
    earlier than row 0: the reference never reads val in its evaluation)."""
    base = os.path.basename(name).lower()
    if "etth" in base or "ettm" in base:
        per_month = 30 * 24 * (4 if "ettm" in base else 1)
        starts = [0, 12 * per_month - context_length, 16 * per_month - context_length]
        ends = [12 * per_month, 16 * per_month, 20 * per_month]
    else:
        num_train, num_test = int(num_rows * 0.7), int(num_rows * 0.2)
        starts = [0, num_train - context_length, num_rows - num_test - context_length]
        ends = [num_train, num_rows - num_test, num_rows]
    starts[1] = max(starts[1], 0)
    if ends[2] > num_rows or starts[2] < 0:
        raise ValueError(
            f"{name}: {num_rows} rows are too few for the benchmark split with context_length={context_length}"
        )
    return starts, ends


#: ``path`` prefix naming a built-in real series instead of a file (``"builtin:taylor"``).
BUILTIN_PREFIX = "builtin:"


def _builtin_frame(path: str):
    """A built-in real series as an ETT-layout frame (a date column, one value column)."""
    pd = import_extra("pandas", "timeseries")

    name = path[len(BUILTIN_PREFIX):]
    series = {s.name: s for s in load_real_series()}
    if name not in series:
        raise ValueError(f"{path!r}: no built-in series {name!r}; choose one of {sorted(series)}")
    values = series[name].values
    return pd.DataFrame({"date": np.arange(len(values)), name: values})


def read_csv_splits(path: str | os.PathLike, context_length: int) -> dict[str, np.ndarray]:
    """Train / val / test blocks of an ETT-layout CSV, scaled by a ``StandardScaler`` fit on train.

    ``path`` may also be ``"builtin:<name>"`` for a series of :func:`load_real_series` laid out
    the same way (split 70/10/20).

    Returns:
        split -> (channels, rows) float32.
    """
    pd = import_extra("pandas", "timeseries")
    from sklearn.preprocessing import StandardScaler

    frame = _builtin_frame(str(path)) if str(path).startswith(BUILTIN_PREFIX) else pd.read_csv(path)
    if frame.shape[1] < 2:
        raise ValueError(f"{path}: expected a date column and at least one value column, got {list(frame.columns)}")
    values = frame[frame.columns[1:]].to_numpy(dtype=np.float64)
    starts, ends = csv_borders(str(path), len(values), context_length)
    scaler = StandardScaler().fit(values[starts[0]:ends[0]])
    return {
        split: scaler.transform(values[s:e]).T.astype(np.float32)
        for split, s, e in zip(("train", "val", "test"), starts, ends)
    }


# -- windows ------------------------------------------------------------------------------------

class WindowDataset(Dataset):
    """Training windows as Time-MoE's ``TimeMoEWindowDataset``: from each series, windows of
    ``max_length + 1`` points at offsets 0, stride, 2 * stride, ...; ``input_ids`` = window[:-1],
    ``labels`` = window[1:], a short window padded with zeros and ``loss_mask`` 0 there.

    Args:
        series: sequences of values (each (length,)).
        max_length: tokens per window.
        stride: offset step (default ``max_length``).
    """

    def __init__(self, series: Sequence[np.ndarray], max_length: int, stride: int | None = None) -> None:
        if max_length < 1 or (stride is not None and stride < 1):
            raise ValueError(f"WindowDataset: max_length and stride must be >= 1, got {max_length}, {stride}")
        # The series are read when a window is (a SyntheticCorpus generates them then).
        self.series = series
        self.max_length = max_length
        stride = stride or max_length
        self.index: list[tuple[int, int]] = []
        lengths = [series.length] * len(series) if isinstance(series, SyntheticCorpus) else [len(s) for s in series]
        for i, length in enumerate(lengths):
            if length < 2:
                continue
            self.index.append((i, 0))
            self.index += [(i, off) for off in range(stride, length - (max_length + 1) + 1, stride)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        i, offset = self.index[item]
        window = np.asarray(self.series[i][offset : offset + self.max_length + 1], dtype=np.float32)
        mask = np.ones(len(window) - 1, dtype=np.float32)
        pad = self.max_length + 1 - len(window)
        if pad:
            window = np.pad(window, (0, pad))
            mask = np.pad(mask, (0, pad))
        return {
            "input_ids": torch.from_numpy(window[:-1].copy()),
            "labels": torch.from_numpy(window[1:].copy()),
            "loss_mask": torch.from_numpy(mask),
        }


class ForecastWindows(Dataset):
    """(context, target) windows sliding over each series, as Time-MoE's evaluation datasets: a window
    of ``context_length + horizon`` points ends at every offset in ``[window, len(series))`` with
    step ``stride`` (the reference uses stride 1 and, as here, never the window ending at the last
    point).

    Items: ``{"context": (context_length,), "target": (horizon,)}`` float32.
    """

    def __init__(self, series: Sequence[np.ndarray], context_length: int, horizon: int, stride: int = 1) -> None:
        if min(context_length, horizon, stride) < 1:
            raise ValueError(f"ForecastWindows: context_length, horizon and stride must be >= 1, got "
                             f"{context_length}, {horizon}, {stride}")
        self.series = [np.asarray(s, dtype=np.float32) for s in series]
        self.context_length, self.horizon = context_length, horizon
        window = context_length + horizon
        self.index = [(i, end) for i, s in enumerate(self.series) for end in range(window, len(s), stride)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        i, end = self.index[item]
        window = self.series[i][end - self.context_length - self.horizon : end]
        return {"context": torch.from_numpy(window[: self.context_length].copy()),
                "target": torch.from_numpy(window[self.context_length :].copy())}


class SeriesDataModule(SplitDataModule):
    """Data for :class:`~moezoo.modalities.timeseries.Forecasting`.

    Training and validation batches are Time-MoE windows (``input_ids``, ``labels``, ``loss_mask``,
    each (batch, max_length)); test batches are forecasting windows (``context``, ``target``).
    Training batches are shuffled from ``seed`` and resume exactly mid-epoch
    (:class:`~moezoo.data.SplitDataModule`).

    Args:
        source: ``"synthetic"``: :func:`kernel_synth` series for training (``seed``) and validation
            (``seed + 1``); the test split is the built-in real series (:func:`load_real_series`),
            z-scored per window by its context, for a zero-shot check. ``"csv"``: an ETT-layout
            file at ``path``, channel-independent, scaled and split as the reference benchmark; the
            test split slides ``test_stride``-spaced windows over the test rows.
        path: the CSV file for ``source="csv"``, or ``"builtin:<name>"`` for a built-in real series
            in the same layout (e.g. ``"builtin:taylor"``, for a demo that runs without files).
        max_length: tokens per training window (the reference fine-tunes with 1024 or the
            context length).
        stride: training window offset step (default ``max_length``).
        num_series, series_length, seed: the synthetic corpus (``seed`` also seeds the shuffling).
        val_series: synthetic validation series.
        context_length, horizon: test windows.
        test_stride: step between test windows (the reference: 1).
        batch_size, eval_batch_size, num_workers: loaders.
    """

    def __init__(
        self,
        source: str = "synthetic",
        path: str | None = None,
        max_length: int = 512,
        stride: int | None = None,
        num_series: int = 2000,
        series_length: int = 1024,
        seed: int = 0,
        val_series: int = 64,
        context_length: int = 512,
        horizon: int = 96,
        test_stride: int = 1,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in ("synthetic", "csv"):
            raise ValueError(f"SeriesDataModule: source must be 'synthetic' or 'csv', got {source!r}")
        if source == "csv" and not path:
            raise ValueError("SeriesDataModule: source='csv' needs path=<ETT-layout CSV file>")
        if min(max_length, num_series, series_length, val_series, context_length, horizon, test_stride,
               batch_size) < 1:
            raise ValueError("SeriesDataModule: sizes, counts and strides must be >= 1")
        self.source, self.path = source, path
        self.max_length, self.stride = max_length, stride
        self.num_series, self.series_length, self.seed, self.val_series = num_series, series_length, seed, val_series
        self.context_length, self.horizon, self.test_stride = context_length, horizon, test_stride
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.splits: dict[str, Dataset] = {}
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.source == "synthetic":
            train = SyntheticCorpus(self.num_series, self.series_length, self.seed)
            val = SyntheticCorpus(self.val_series, self.series_length, self.seed + 1)
            splits = {
                "train": WindowDataset(train, self.max_length, self.stride),
                "val": WindowDataset(val, self.max_length),
                "test": _ZScored(ForecastWindows([s.values for s in load_real_series()], self.context_length,
                                                 self.horizon, self.test_stride)),
            }
        else:
            if not self.path.startswith(BUILTIN_PREFIX) and not Path(self.path).is_file():
                raise FileNotFoundError(f"SeriesDataModule: no CSV file at {self.path}")
            blocks = read_csv_splits(self.path, self.context_length)
            splits = {
                "train": WindowDataset(list(blocks["train"]), self.max_length, self.stride),
                "val": WindowDataset(list(blocks["val"]), self.max_length),
                "test": ForecastWindows(list(blocks["test"]), self.context_length, self.horizon, self.test_stride),
            }
        # Incomplete training batches are dropped: too few windows would make `fit` end silently.
        windows = len(splits["train"])
        if windows < self.batch_size:
            raise ValueError(
                f"SeriesDataModule: the training split has {windows} windows of max_length={self.max_length} "
                f"(stride={self.stride or self.max_length}), fewer than batch_size={self.batch_size}; lower "
                "stride, max_length or batch_size"
            )
        self.splits = splits

    def dataset_for(self, split: str) -> Dataset:
        self.setup()
        return self.splits[split]


class _ZScored(Dataset):
    """Forecast windows z-scored by their context's mean and std (std 1 for a constant context)."""

    def __init__(self, windows: ForecastWindows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        w = self.windows[item]
        mean, std = w["context"].mean(), w["context"].std()
        std = std if std > 0 else torch.ones(())
        return {"context": (w["context"] - mean) / std, "target": (w["target"] - mean) / std}
