"""Cluster budget policies: how Group-MATES' exact total budget is shared among the clusters.

The paper (and the reference code) give every cluster the same ratio, ``uniform``: floor(r|C|) or ceil(r|C|)
documents (``selection.cluster_budgets``). The greedy inside a cluster only chooses *which* documents; it can
never drop a harmful cluster. Two policies share the same total n = sum of the uniform budgets differently:

* ``influence_weighted``: cluster C's share follows its predicted benefit b_C, the mean predicted marginal
  influence of the documents its greedy picks first (the uniform picks; negative = beneficial). With z_C the
  benefit standardised over the non-empty clusters, the real-valued budget is
  ``clip(lam * |C| * exp(-sharpness * z_C), floor_C, cap_C)`` with lam solved so the budgets sum to n, then
  rounded to integers by largest remainder inside [floor_C, cap_C] so the total stays exactly n.
* ``global``: the greedy with the relational term over the whole pool, with the relational term restricted to
  the document's own cluster (the bounded-memory approximation: a step never compares a candidate with
  another cluster's selection). Selecting a document changes only its own cluster's scores, so the best candidate
  of a cluster is always the next element of that cluster's greedy sequence and the global greedy is the
  priority-queue merge of the per-cluster sequences by their marginal gains. For sequences that are not
  monotone, the merge order equals a stable sort by each element's prefix maximum within its cluster
  (``merge_order``; ``heap_merge`` is the literal merge, for tests), so the ranges compute their sequences
  independently and one small step takes the n smallest. Every cluster first keeps its floor, and none exceeds
  its cap (the length of the sequence computed for it).

Both policies use the same floor and cap per cluster: floor_C = floor(floor * |C|), cap_C = min(|C|,
ceil(cap * |C|)), with floor <= ratio <= cap, so the uniform budget always lies between them. Because a cluster's
greedy picks never depend on its budget (a budget only says when to stop), every policy's selection of a
cluster is a prefix of one greedy sequence, computed once up to cap_C (``sequence_lengths``).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNIFORM, WEIGHTED, GLOBAL = "uniform", "influence_weighted", "global"
POLICIES = (UNIFORM, WEIGHTED, GLOBAL)
_EPS = 1e-9


@dataclass(frozen=True)
class PolicyLimits:
    """Per-cluster bounds of the non-uniform policies as shares of the cluster, and the weighted policy's
    sharpness (0: budgets proportional to size, i.e. the uniform ratio up to rounding)."""

    floor: float = 0.1
    cap: float = 1.0
    sharpness: float = 1.0

    def validate(self, ratio: float) -> None:
        if not (0 <= self.floor <= ratio <= self.cap <= 1):
            raise ValueError(f"cluster budget limits must satisfy 0 <= floor <= ratio <= cap <= 1, got floor "
                             f"{self.floor}, ratio {ratio}, cap {self.cap}")
        if not (self.sharpness >= 0 and np.isfinite(self.sharpness)):
            raise ValueError(f"the weighted policy's sharpness must be a finite number >= 0, got {self.sharpness}")


def floor_counts(sizes: np.ndarray, floor: float) -> np.ndarray:
    """floor(floor * |C|) per cluster: what a non-uniform policy never goes below."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.minimum(np.floor(sizes * float(floor) + _EPS).astype(np.int64), sizes)


def cap_counts(sizes: np.ndarray, cap: float) -> np.ndarray:
    """min(|C|, ceil(cap * |C|)) per cluster: what a non-uniform policy never goes above."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.minimum(np.ceil(sizes * float(cap) - _EPS).astype(np.int64), sizes)


def sequence_lengths(sizes: np.ndarray, uniform: np.ndarray, limits: PolicyLimits) -> np.ndarray:
    """How far each cluster's greedy sequence is computed: the most any policy may take from it."""
    return np.maximum(np.asarray(uniform, dtype=np.int64), cap_counts(sizes, limits.cap))


def cluster_benefit(cluster: np.ndarray, rank: np.ndarray, predicted: np.ndarray, ids: np.ndarray,
                    uniform: np.ndarray) -> np.ndarray:
    """Per cluster of ``ids``: the mean predicted marginal influence of its first max(1, uniform budget) greedy
    picks (its uniform selection; a cluster whose uniform budget is 0 is judged by its first pick). NaN for a
    cluster without picks. ``uniform`` is indexed like ``ids``."""
    ids = np.asarray(ids, dtype=np.int64)
    position = np.searchsorted(ids, cluster)
    if len(cluster) and (np.any(position >= len(ids)) or np.any(ids[np.minimum(position, len(ids) - 1)] != cluster)):
        raise ValueError("a greedy pick belongs to a cluster that is not listed")
    counted = rank < np.maximum(np.asarray(uniform, dtype=np.int64)[position], 1) if len(cluster) else \
        np.zeros(0, dtype=bool)
    sums = np.bincount(position[counted], weights=np.asarray(predicted, dtype=np.float64)[counted],
                       minlength=len(ids))
    counts = np.bincount(position[counted], minlength=len(ids))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _check_total(total: int, low: np.ndarray, high: np.ndarray) -> None:
    if not int(low.sum()) <= total <= int(high.sum()):
        raise ValueError(f"a total budget of {total} cannot be met between the floors ({int(low.sum())}) and the "
                         f"caps ({int(high.sum())})")


def standardized(benefit: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(b - mean) / std over the non-empty clusters with a finite benefit; 0 where there is no spread (or no
    benefit), so equal benefits give budgets proportional to size."""
    benefit = np.asarray(benefit, dtype=np.float64)
    valid = (np.asarray(sizes) > 0) & np.isfinite(benefit)
    z = np.zeros(len(benefit))
    if valid.sum() >= 2:
        spread = benefit[valid].std()
        if spread > 0:
            z[valid] = (benefit[valid] - benefit[valid].mean()) / spread
    return z


def weighted_budgets(sizes: np.ndarray, benefit: np.ndarray, total: int, limits: PolicyLimits) -> np.ndarray:
    """The influence-weighted budgets: clip(lam * |C| * exp(-sharpness * z_C), floor_C, cap_C), lam such that they
    sum to ``total``, rounded by largest remainder (ties by cluster id) inside the bounds: exactly ``total``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    low, high = floor_counts(sizes, limits.floor), cap_counts(sizes, limits.cap)
    _check_total(total, low, high)
    weight = sizes * np.exp(-limits.sharpness * standardized(benefit, sizes))
    real = _water_fill(weight, low.astype(np.float64), high.astype(np.float64), float(total))
    return _round_to_total(real, low, high, total)


def _water_fill(weight: np.ndarray, low: np.ndarray, high: np.ndarray, total: float) -> np.ndarray:
    """clip(lam * weight, low, high) summing to ``total``: the sum is continuous and non-decreasing in lam, so
    bisection finds lam (to float precision; the rounding step makes the total exact)."""
    if total <= low.sum() + _EPS:
        return low.copy()
    if total >= high.sum() - _EPS:
        return high.copy()
    positive = weight > 0
    lo_lam, hi_lam = 0.0, float(np.max(high[positive] / weight[positive]))
    for _ in range(200):
        lam = 0.5 * (lo_lam + hi_lam)
        if np.clip(lam * weight, low, high).sum() < total:
            lo_lam = lam
        else:
            hi_lam = lam
    return np.clip(hi_lam * weight, low, high)


def _round_to_total(real: np.ndarray, low: np.ndarray, high: np.ndarray, total: int) -> np.ndarray:
    """Integers inside [low, high] summing to ``total``, each floor(real) or one more: the largest remainders
    (ties by cluster id) get the extra documents."""
    base = np.clip(np.floor(real + _EPS).astype(np.int64), low, high)
    while (missing := total - int(base.sum())) != 0:
        fraction = real - base
        if missing > 0:
            room = np.flatnonzero(base < high)
            chosen = room[np.lexsort((room, -fraction[room]))][:missing]
            base[chosen] += 1
        else:
            room = np.flatnonzero(base > low)
            chosen = room[np.lexsort((room, fraction[room]))][:-missing]
            base[chosen] -= 1
        if not len(chosen):
            raise ValueError(f"cannot round the budgets to a total of {total}")
    return base


def prefix_maxima(cluster: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Running maximum of ``gain`` within each cluster's run; rows must be sorted by (cluster, rank)."""
    gain = np.asarray(gain, dtype=np.float64)
    out = np.empty_like(gain)
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]]) if len(cluster) else np.zeros(0, np.int64)
    for start, stop in zip(starts, np.r_[starts[1:], len(cluster)], strict=True):
        out[start:stop] = np.maximum.accumulate(gain[start:stop])
    return out


def merge_order(cluster: np.ndarray, rank: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """The order in which the priority-queue merge of per-cluster greedy sequences (lowest head first, ties to the
    lower cluster id) takes the rows: a stable sort by (prefix maximum of the gains within the cluster, cluster,
    rank). Rows may come in any order; returns row indices."""
    cluster, rank = np.asarray(cluster, dtype=np.int64), np.asarray(rank, dtype=np.int64)
    by_sequence = np.lexsort((rank, cluster))
    keys = np.empty(len(cluster))
    keys[by_sequence] = prefix_maxima(cluster[by_sequence], np.asarray(gain)[by_sequence])
    return np.lexsort((rank, cluster, keys))


def heap_merge(sequences: dict[int, Sequence[float]], count: int) -> list[tuple[int, int]]:
    """The literal merge: (cluster, rank) of the first ``count`` elements taken by always popping the lowest head
    gain (ties to the lower cluster id). The reference for ``merge_order``."""
    heap = [(float(gains[0]), c, 0) for c, gains in sequences.items() if len(gains)]
    heapq.heapify(heap)
    out = []
    while heap and len(out) < count:
        _, c, r = heapq.heappop(heap)
        out.append((c, r))
        if r + 1 < len(sequences[c]):
            heapq.heappush(heap, (float(sequences[c][r + 1]), c, r + 1))
    return out


def global_budgets(ids: np.ndarray, sizes: np.ndarray, cluster: np.ndarray, rank: np.ndarray, gain: np.ndarray,
                   total: int, limits: PolicyLimits) -> np.ndarray:
    """The global policy's budgets for the clusters ``ids`` (with ``sizes``), from every cluster's greedy sequence
    (rows ``cluster``, ``rank``, marginal ``gain``, up to the cluster's cap): each cluster's floor, then the
    ``total - sum of floors`` first rows of the merge of what follows the floors."""
    ids, sizes = np.asarray(ids, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    cluster, rank = np.asarray(cluster, dtype=np.int64), np.asarray(rank, dtype=np.int64)
    low, high = floor_counts(sizes, limits.floor), cap_counts(sizes, limits.cap)
    _check_total(total, low, high)
    position = np.searchsorted(ids, cluster)
    length = np.bincount(position, minlength=len(ids))
    if np.any(length < high):
        short = ids[np.flatnonzero(length < high)[:5]].tolist()
        raise ValueError(f"greedy sequences shorter than the caps for clusters {short}: recompute the sequences "
                         "(materialize selected_documents) with this cap")
    tail = (rank >= low[position]) & (rank < high[position])
    order = merge_order(cluster[tail], rank[tail], np.asarray(gain)[tail])
    taken = position[np.flatnonzero(tail)[order[:total - int(low.sum())]]]
    return low + np.bincount(taken, minlength=len(ids))


def check_budgets(budgets: np.ndarray, sizes: np.ndarray, total: int, limits: PolicyLimits | None) -> dict:
    """What the budgets are checked for: the exact total, and (for a bounded policy) every cluster between its
    floor and its cap."""
    budgets, sizes = np.asarray(budgets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    low = floor_counts(sizes, limits.floor) if limits else np.zeros_like(sizes)
    high = cap_counts(sizes, limits.cap) if limits else sizes
    return {"total": int(budgets.sum()), "expected_total": int(total),
            "below_floor": int((budgets < low).sum()), "above_cap": int((budgets > high).sum()),
            "passed": bool(int(budgets.sum()) == total and np.all(budgets >= low) and np.all(budgets <= high))}
