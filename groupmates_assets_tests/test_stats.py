"""Interval arithmetic of lib.stats on hand-made scores: paired and stratified bootstrap, Student t, sample std."""

from __future__ import annotations

import math

import numpy as np
import pytest

from groupmates_assets.lib import stats

pytestmark = pytest.mark.unit


def _hits(n: int, correct: int, offset: int = 0) -> np.ndarray:
    """n items of which ``correct`` are 1, placed from ``offset`` on (cyclically)."""
    hits = np.zeros(n)
    hits[[(offset + i) % n for i in range(correct)]] = 1
    return hits


def test_identical_models_give_a_zero_width_interval_at_zero():
    a = [_hits(20, 7), _hits(20, 12)]
    interval = stats.stratified_mean_difference([x - x for x in a], weights=[2.0, 1 / 0.38])
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert interval.covers_zero and interval.n == 40
    docs = stats.ratio_difference([0.0] * 10, [100.0] * 10, scale=1 / math.log(2))
    assert (docs.low, docs.high) == (0.0, 0.0)


def test_a_large_shift_is_excluded_from_zero_and_a_small_one_is_covered():
    # 8 tasks of 20 items; the model is right on 15 items more per task than the baseline (+0.75 accuracy)
    large = [_hits(20, 15) - _hits(20, 0) for _ in range(8)]
    interval = stats.stratified_mean_difference(large, weights=[2.0] * 8)
    assert interval.estimate == pytest.approx(1.5) and not interval.covers_zero and interval.low > 0
    # one more item right and one other item wrong per task, a shift of 0 with noise; then +1 item in one task
    noisy = [_hits(20, 1, k) - _hits(20, 1, k + 1) for k in range(8)]
    assert stats.stratified_mean_difference(noisy).covers_zero
    noisy[0] = _hits(20, 2) - _hits(20, 1, 5)
    small = stats.stratified_mean_difference(noisy)
    assert small.estimate == pytest.approx(0.05 / 8) and small.covers_zero and small.low < small.high


def test_resampling_never_moves_items_between_tasks():
    # task A differences are 0 or 1 (mean 0.5), task B's are all 5: the statistic (mean_A + 5) / 2 stays within
    # [2.5, 3.0] only while every resample draws A's items for A and B's for B.
    a, b = np.tile([0.0, 1.0], 10), np.full(20, 5.0)
    interval = stats.stratified_mean_difference([a, b])
    assert interval.estimate == pytest.approx(2.75)
    assert 2.5 <= interval.low < interval.high <= 3.0
    pooled = stats.stratified_mean_difference([np.concatenate([a, b])])  # the same 40 items as one task
    assert pooled.low < 2.5 and pooled.high > 3.0


def test_the_resampling_seed_makes_intervals_reproducible():
    rng = np.random.default_rng(0)
    differences = [rng.normal(0.1, 1.0, 30), rng.normal(-0.2, 0.5, 25)]  # continuous: the endpoints move with seed
    first = stats.stratified_mean_difference(differences, seed=3)
    assert stats.stratified_mean_difference(differences, seed=3) == first
    assert stats.stratified_mean_difference(differences, seed=4) != first


def test_bits_per_byte_difference_is_pooled_over_documents():
    # every document is 0.1 bits per byte worse: the pooled ratio is 0.1 in every resample
    n_bytes = np.array([100.0, 250.0, 40.0, 900.0, 60.0])
    interval = stats.ratio_difference(0.1 * math.log(2) * n_bytes, n_bytes, scale=1 / math.log(2))
    assert interval.estimate == pytest.approx(0.1)
    assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)
    with pytest.raises(ValueError, match="equally many"):
        stats.ratio_difference([1.0, 2.0], [3.0])


def test_t_interval_matches_a_t_table():
    # [1, 2, 3, 4]: mean 2.5, s = 1.2910, s / sqrt(4) = 0.6455; t(0.975, 3 df) = 3.182 from a t table
    interval = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182 * 1.2910 / 2
    assert interval.estimate == 2.5 and interval.n == 4
    assert interval.low == pytest.approx(2.5 - half, abs=2e-3) and interval.high == pytest.approx(2.5 + half, abs=2e-3)
    assert stats.t_interval([1.0]) is None and stats.t_interval([1.0, None, math.nan]) is None


def test_sample_std_uses_ddof_1():
    assert stats.sample_std([1.0, 3.0]) == pytest.approx(math.sqrt(2))  # the population formula gives 1.0
    assert stats.sample_std([2.0]) is None


def test_interval_text_and_bootstrap_spec():
    interval = stats.Interval(0.0123, -0.031, 0.055, 0.95, "paired bootstrap", 160)
    assert interval.text() == "+0.0123 [-0.0310, +0.0550]" and interval.covers_zero
    assert stats.Interval(**interval.as_dict()) == interval
    assert stats.BootstrapSpec().as_dict() == {"resamples": 2000, "confidence": 0.95, "seed": 0}
    with pytest.raises(ValueError, match="confidence"):
        stats.BootstrapSpec(confidence=1.5)
