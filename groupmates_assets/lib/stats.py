"""Intervals for comparing two models or two selections on the same items (no Dagster).

Comparisons are paired: both sides are scored on the same evaluation items, held-out documents or oracle groups,
so the interval is computed on per-item differences, which removes the items' own difficulty from the noise.
Resampling uses `scipy.stats.bootstrap` (percentile intervals: they stay defined when every difference is 0, where
BCa is not). Spread over seeds uses the sample standard deviation and a Student t interval.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
RESAMPLES = 2000
BOOTSTRAP_VALUES = 8_000_000


@dataclasses.dataclass(frozen=True)
class BootstrapSpec:
    """How intervals are drawn: resamples, confidence level and the resampling seed (recorded with the figures)."""

    resamples: int = RESAMPLES
    confidence: float = CONFIDENCE
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.resamples, int) or self.resamples < 100:
            raise ValueError(f"bootstrap resamples must be a whole number >= 100, got {self.resamples!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval; ``method`` and ``n`` say what it was computed over."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    n: int

    @property
    def covers_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def as_dict(self) -> dict[str, float | str | int]:
        return dataclasses.asdict(self)

    def text(self, digits: int = 4) -> str:
        """`+0.0123 [-0.0040, +0.0290]`."""
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _percentile_bootstrap(data: tuple[np.ndarray, ...], statistic, paired: bool, resamples: int, seed: int,
                          confidence: float) -> tuple[float, float]:
    if all(np.all(d == d.flat[0]) for d in data) and paired:  # every resample equals the sample
        value = float(statistic(*data))
        return value, value
    # Resamples drawn per vectorised call: bounds memory to ~BOOTSTRAP_VALUES resampled values (full validation
    # splits are ~20k items), without changing small problems, which run in one batch.
    batch = max(1, min(resamples, BOOTSTRAP_VALUES // max(1, sum(d.size for d in data))))
    result = sps.bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=resamples, batch=batch,
                           confidence_level=confidence, method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def stratified_mean_difference(differences: Sequence[Sequence[float]], weights: Sequence[float] | None = None,
                               resamples: int = RESAMPLES, seed: int = 0,
                               confidence: float = CONFIDENCE) -> Interval:
    """Interval of ``mean_k(weight_k * mean(differences[k]))``: per-item paired differences in strata (tasks),
    resampled within each stratum (a stratified bootstrap), then averaged over strata with equal weight.

    With one stratum and weight 1 this is the paired bootstrap of a mean difference. For centered accuracy the
    weight of task k is 1 / (1 - random_baseline_k), so the statistic is the difference of mean centered accuracy.
    """
    arrays = tuple(np.asarray(d, dtype=np.float64) for d in differences)
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("every stratum needs at least one paired difference")
    w = np.ones(len(arrays)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(arrays):
        raise ValueError(f"{len(w)} weights for {len(arrays)} strata")

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([wk * np.mean(s, axis=axis) for wk, s in zip(w, samples, strict=True)], axis=0)

    estimate = float(statistic(*arrays))
    if len(arrays) == 1:
        low, high = _percentile_bootstrap(arrays, statistic, True, resamples, seed, confidence)
    elif all(np.all(a == a[0]) for a in arrays):
        low = high = estimate
    else:
        low, high = _percentile_bootstrap(arrays, statistic, False, resamples, seed, confidence)
    method = "paired bootstrap" + (f", stratified over {len(arrays)} tasks" if len(arrays) > 1 else "")
    return Interval(estimate, low, high, confidence, method, int(sum(a.size for a in arrays)))


def ratio_difference(numerator_differences: Sequence[float], denominators: Sequence[float], scale: float = 1.0,
                     resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Interval of ``scale * sum(numerator_differences) / sum(denominators)`` over paired documents resampled
    together: the difference of two pooled ratios with a shared denominator (bits per byte: NLL differences over
    bytes, scale 1 / ln 2)."""
    diff = np.asarray(numerator_differences, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if diff.size == 0 or diff.shape != den.shape:
        raise ValueError(f"need equally many numerators and denominators, got {diff.size} and {den.size}")

    def statistic(d: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return scale * np.sum(d, axis=axis) / np.sum(b, axis=axis)

    estimate = float(statistic(diff, den))
    low, high = _percentile_bootstrap((diff, den), statistic, True, resamples, seed, confidence)
    return Interval(estimate, low, high, confidence, "paired bootstrap over documents", int(diff.size))


def sample_std(values: Sequence[float]) -> float | None:
    """Standard deviation with ddof=1 (the population formula understates the spread of 2-3 seeds); None for n < 2."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.std(finite, ddof=1)) if len(finite) >= 2 else None


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """Student t interval of the mean of ``values`` (per-seed results or per-seed differences); None for n < 2."""
    finite = np.asarray([float(v) for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size < 2:
        return None
    mean, std = float(finite.mean()), float(finite.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, df=finite.size - 1)) * std / math.sqrt(finite.size)
    return Interval(mean, mean - half, mean + half, confidence, f"Student t over {finite.size} seeds",
                    int(finite.size))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties averaged); nan when either side is constant."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(sps.spearmanr(x, y).statistic)
