"""Cluster budget policies (lib.budgets): the exact total for every policy, floors and caps, the uniform policy as
today's Group-MATES bit for bit, the global policy as the global greedy, determinism, and a planted harmful
cluster."""

import numpy as np
import pytest
import torch

from groupmates_assets import settings as settings_module
from groupmates_assets.lib import budgets as bl
from groupmates_assets.lib import selection as sel

pytestmark = pytest.mark.unit

LIMITS = bl.PolicyLimits(floor=0.1, cap=0.9, sharpness=1.0)


def _pool(sizes, d=8, seed=0, harmful=()):
    """Documents of clusters with the given sizes, unit-ish embeddings, u < 0 except in the ``harmful`` clusters."""
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(len(sizes)), sizes)
    h = rng.normal(size=(len(clusters), d))
    h = 0.9 * h / np.linalg.norm(h, axis=1, keepdims=True)
    u = rng.normal(-1.0, 0.5, size=len(clusters))
    for c in harmful:
        u[clusters == c] = rng.normal(1.0, 0.3, size=int((clusters == c).sum()))
    return h.astype(np.float32), u.astype(np.float32), clusters


def _sequences(sizes, h, u, clusters, limits=LIMITS, ratio=0.5, rounding="floor"):
    sizes = np.asarray(sizes)
    uniform = sel.cluster_budgets(sizes, ratio, rounding)
    return uniform, sel.select_in_clusters(h, u, clusters, bl.sequence_lengths(sizes, uniform, limits), 1.2, 0.9)


def _policy_budgets(sizes, h, u, clusters, limits=LIMITS, ratio=0.5, rounding="floor"):
    uniform, seq = _sequences(sizes, h, u, clusters, limits, ratio, rounding)
    ids = np.arange(len(sizes))
    benefit = bl.cluster_benefit(seq.cluster, seq.rank, seq.predicted, ids, uniform)
    total = int(uniform.sum())
    return {bl.UNIFORM: uniform, bl.WEIGHTED: bl.weighted_budgets(sizes, benefit, total, limits),
            bl.GLOBAL: bl.global_budgets(ids, sizes, seq.cluster, seq.rank, seq.predicted, total, limits)}, total


@pytest.mark.parametrize(("ratio", "rounding", "limits"), [
    (0.5, "floor", LIMITS), (0.5, "ceil", LIMITS), (0.3, "floor", bl.PolicyLimits(0.0, 1.0, 2.0)),
    (0.5, "floor", bl.PolicyLimits(0.5, 0.5, 1.0)), (0.7, "ceil", bl.PolicyLimits(0.2, 1.0, 0.0))])
def test_every_policy_meets_the_exact_total_between_floors_and_caps(ratio, rounding, limits):
    sizes = np.array([1, 7, 30, 0, 12, 55, 3, 19, 2, 40])  # a singleton and an empty cluster among them
    h, u, clusters = _pool(sizes, seed=3, harmful=(5,))
    policies, total = _policy_budgets(sizes, h, u, clusters, limits, ratio, rounding)
    low, high = bl.floor_counts(sizes, limits.floor), bl.cap_counts(sizes, limits.cap)
    for name, counts in policies.items():
        assert counts.dtype == np.int64 and int(counts.sum()) == total, name
        assert np.all(counts <= sizes) and counts[3] == 0, name
        if name != bl.UNIFORM:
            assert np.all(counts >= low) and np.all(counts <= high), name
            assert bl.check_budgets(counts, sizes, total, limits)["passed"]
    if limits.floor == limits.cap == ratio:  # no room to move: every policy is the uniform one
        assert all(np.array_equal(c, policies[bl.UNIFORM]) for c in policies.values())


def test_budget_checks_fire_on_a_wrong_total_and_on_bounds():
    sizes = np.array([10, 10])
    assert bl.check_budgets(np.array([5, 5]), sizes, 10, LIMITS)["passed"]
    assert not bl.check_budgets(np.array([5, 4]), sizes, 10, LIMITS)["passed"]  # total
    below = bl.check_budgets(np.array([0, 10]), sizes, 10, LIMITS)  # floor 1, cap 9
    assert not below["passed"] and below["below_floor"] == 1 and below["above_cap"] == 1


def test_uniform_is_the_prefix_of_the_longer_sequences_bit_for_bit():
    """The uniform selection cut from the sequences computed up to the caps equals today's selection with the
    uniform budgets exactly (rows, order and float scores), on every code path: one Gram batch, several, and the
    no-Gram fallback."""
    sizes = np.array([40, 3, 25, 60, 1, 33, 17])
    h, u, clusters = _pool(sizes, seed=5)
    budgets = sel.cluster_budgets(sizes, 0.5)
    lengths = bl.sequence_lengths(sizes, budgets, bl.PolicyLimits(cap=1.0))
    assert np.array_equal(lengths, sizes)
    for max_elements in (1 << 26, 4_000, 10):
        today = sel.select_in_clusters(h, u, clusters, budgets, 1.3, 0.8, max_elements=max_elements)
        cut = sel.prefix(sel.select_in_clusters(h, u, clusters, lengths, 1.3, 0.8, max_elements=max_elements),
                         budgets)
        for field in ("rows", "cluster", "rank", "predicted"):  # exact values (the table stores float32)
            assert np.array_equal(getattr(cut, field), getattr(today, field)), (max_elements, field)


def test_merge_order_is_the_priority_queue_merge_of_the_sequences():
    rng = np.random.default_rng(1)
    for trial in range(30):
        lengths = rng.integers(0, 9, size=6)
        gains = {c: rng.integers(-5, 5, size=n).astype(float) if trial % 2 else rng.normal(size=n)
                 for c, n in enumerate(lengths)}  # integer gains: many ties
        cluster = np.concatenate([np.full(len(g), c) for c, g in gains.items()])
        rank = np.concatenate([np.arange(len(g)) for g in gains.values()])
        gain = np.concatenate(list(gains.values()))
        shuffled = rng.permutation(len(gain))  # rows may come in any order
        order = shuffled[bl.merge_order(cluster[shuffled], rank[shuffled], gain[shuffled])]
        expected = bl.heap_merge(gains, len(gain))
        assert list(zip(cluster[order].tolist(), rank[order].tolist(), strict=True)) == expected


def _global_greedy(h, u, clusters, caps, total, alpha, tau):
    """The greedy over the whole pool with the relational term of the candidate's own cluster, step by step."""
    h, u = h.astype(np.float64), u.astype(np.float64)
    chosen = np.zeros(len(u), dtype=bool)
    sums = {c: np.zeros(h.shape[1]) for c in np.unique(clusters)}
    counts = {c: 0 for c in sums}
    for _ in range(total):
        best, best_key = None, None
        for c in sums:
            if counts[c] >= caps[c]:
                continue
            rows = np.flatnonzero((clusters == c) & ~chosen)
            score = u[rows] if counts[c] == 0 else alpha * u[rows] * (1 - h[rows] @ (sums[c] / counts[c]) / tau)
            j = int(np.argmin(score))
            if best_key is None or (score[j], c) < best_key:
                best, best_key = rows[j], (score[j], c)
        chosen[best] = True
        sums[clusters[best]] += h[best]
        counts[clusters[best]] += 1
    return np.array([counts[c] for c in sorted(counts)])


def test_global_policy_is_the_global_greedy_with_the_relational_term_in_its_own_cluster():
    sizes = np.array([12, 5, 20, 9])
    h, u, clusters = _pool(sizes, seed=7, harmful=(2,))
    u[clusters == 1] -= 1.5  # one very good small cluster: the greedy should want all of it, up to its cap
    limits = bl.PolicyLimits(floor=0.0, cap=0.9)
    uniform = sel.cluster_budgets(sizes, 0.5)
    seq = sel.select_in_clusters(h.astype(np.float64), u.astype(np.float64), clusters,
                                 bl.sequence_lengths(sizes, uniform, limits), 1.2, 0.9, dtype=torch.float64)
    total = int(uniform.sum())
    ours = bl.global_budgets(np.arange(4), sizes, seq.cluster, seq.rank, seq.predicted, total, limits)
    expected = _global_greedy(h, u, clusters, bl.cap_counts(sizes, limits.cap), total, 1.2, 0.9)
    assert ours.tolist() == expected.tolist()
    assert ours[1] == bl.cap_counts(sizes, 0.9)[1] and ours[2] < uniform[2]


def test_a_planted_harmful_cluster_shrinks_under_the_weighted_and_global_policies_only():
    sizes = np.array([40, 40, 40, 40])
    h, u, clusters = _pool(sizes, seed=11, harmful=(2,))  # cluster 2: predicted to raise the reference loss
    policies, total = _policy_budgets(sizes, h, u, clusters)
    assert policies[bl.UNIFORM].tolist() == [20, 20, 20, 20]  # the paper's ratio never drops it
    assert 4 == bl.floor_counts(sizes, 0.1)[2] <= policies[bl.WEIGHTED][2] < 20
    assert np.all(np.delete(policies[bl.WEIGHTED], 2) > 20)  # what it gives up goes to the beneficial clusters
    assert policies[bl.GLOBAL][2] == 4  # nothing past its floor: every later pick is predicted to do harm
    assert all(int(policies[name].sum()) == total == 80 for name in bl.POLICIES)


def test_policies_are_deterministic_and_ignore_the_order_of_the_sequence_rows():
    sizes = np.array([15, 22, 9, 31])
    h, u, clusters = _pool(sizes, seed=2, harmful=(0,))
    first, _ = _policy_budgets(sizes, h, u, clusters)
    again, _ = _policy_budgets(sizes, h, u, clusters)
    assert all(np.array_equal(first[p], again[p]) for p in bl.POLICIES)
    uniform, seq = _sequences(sizes, h, u, clusters)
    shuffled = np.random.default_rng(0).permutation(len(seq))
    permuted = bl.global_budgets(np.arange(4), sizes, seq.cluster[shuffled], seq.rank[shuffled],
                                 seq.predicted[shuffled], int(uniform.sum()), LIMITS)
    assert np.array_equal(permuted, first[bl.GLOBAL])


def test_weighted_budgets_follow_the_benefit_and_equal_benefits_follow_the_size():
    sizes = np.array([100, 100, 100, 100, 50])
    total = 250
    equal = bl.weighted_budgets(sizes, np.full(5, -0.3), total, LIMITS)
    assert equal.tolist() == [56, 56, 55, 55, 28]  # 55.6 and 27.8 by largest remainder, ties to the lower id
    ranked = bl.weighted_budgets(sizes[:4], np.array([-2.0, -1.0, 0.0, 1.0]), 200, LIMITS)
    assert ranked.tolist() == sorted(ranked.tolist(), reverse=True) and ranked[0] > ranked[3]
    flat = bl.weighted_budgets(sizes[:4], np.array([-2.0, -1.0, 0.0, 1.0]), 200, bl.PolicyLimits(0.1, 0.9, 0.0))
    assert flat.tolist() == [50, 50, 50, 50]  # sharpness 0: proportional to size
    with pytest.raises(ValueError, match="cannot be met between the floors"):
        bl.weighted_budgets(sizes, np.zeros(5), 460, LIMITS)  # the caps hold at most 90 + 90 + 90 + 90 + 45


def test_cluster_benefit_is_the_mean_predicted_influence_of_the_uniform_picks():
    cluster = np.array([0, 0, 0, 1, 1, 3])
    rank = np.array([0, 1, 2, 0, 1, 0])
    predicted = np.array([-3.0, -1.0, 9.0, 2.0, 4.0, -0.5])
    benefit = bl.cluster_benefit(cluster, rank, predicted, np.arange(4), np.array([2, 0, 0, 1]))
    assert benefit[:2].tolist() == [-2.0, 2.0] and np.isnan(benefit[2]) and benefit[3] == -0.5


def test_the_profile_validates_the_policy_limits():
    profile = settings_module.SelectionProfile(budget_floor=0.2, budget_cap=0.8, weighted_sharpness=2.0)
    assert profile.policy_limits() == bl.PolicyLimits(0.2, 0.8, 2.0)
    low_ratio = settings_module.SelectionProfile(ratio=0.05, budget_cap=0.04)  # the bounds follow a small ratio
    assert low_ratio.policy_limits() == bl.PolicyLimits(0.05, 0.05, 1.0)
    for field, value, message in (("budget_floor", 1.5, r"selection\.budget_floor"),
                                  ("budget_cap", -0.1, r"selection\.budget_cap"),
                                  ("weighted_sharpness", -1.0, r"selection\.weighted_sharpness")):
        with pytest.raises(ValueError, match=message):
            settings_module.SelectionProfile(**{field: value})
