"""Cluster-based greedy group selection: invariants T3, T4, T12-T16 and the baselines."""

import numpy as np
import pytest

from groupmates_assets.lib import clustering
from groupmates_assets.lib import selection as sel

pytestmark = pytest.mark.unit


def _pool(n=400, d=12, clusters=6, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    h = 0.9 * h / np.linalg.norm(h, axis=1, keepdims=True)
    return h, rng.normal(size=n).astype(np.float32), rng.integers(0, clusters, n)


def test_t4_duplicate_example():
    e = np.eye(3, dtype=np.float32)
    h = np.stack([e[0], e[0], e[1], e[2]])  # A, A', B, C
    u = np.array([-3.0, -3.0, -1.0, 1.0], dtype=np.float32)
    same = np.zeros(4, dtype=np.int64)
    assert sel.select_in_clusters(h, u, same, {0: 2}, 1.0, 1.0).rows.tolist() == [0, 2]  # A, B; not A, A'
    three = sel.select_in_clusters(h, u, same, {0: 3}, 1.0, 1.0)
    assert three.rows.tolist() == [0, 2, 1]  # then A' at -3 x (1 - 1/2) = -1.5 < C's +1
    assert three.predicted.tolist() == pytest.approx([-3.0, -1.0, -1.5])
    assert sel.top_k(u, 2, lowest=True).tolist() == [0, 1]  # individual top-2 = {A, A'}


def test_t3_zeroed_relationships_reproduce_individual_top_k_per_cluster():
    _, u, clusters = _pool()
    h = np.zeros((len(u), 12), dtype=np.float32)
    budgets = sel.cluster_budgets(np.bincount(clusters), 0.5)
    picked = sel.select_in_clusters(h, u, clusters, budgets, alpha=1.0, tau=1.0)
    for cluster in np.unique(clusters):
        rows = np.flatnonzero(clusters == cluster)
        expected = rows[np.argsort(u[rows], kind="stable")[:budgets[cluster]]]
        assert set(picked.rows[picked.cluster == cluster]) == set(expected)


def test_relationships_change_the_selection():
    h, u, clusters = _pool()
    budgets = sel.cluster_budgets(np.bincount(clusters), 0.3)
    relational = sel.select_in_clusters(h, u, clusters, budgets, 1.0, 0.5)
    individual = sel.select_in_clusters(np.zeros_like(h), u, clusters, budgets, 1.0, 0.5)
    assert set(relational.rows) != set(individual.rows)


@pytest.mark.parametrize("rounding", ["floor", "ceil"])
def test_t12_exact_budgets_no_duplicates_valid_rows(rounding):
    h, u, clusters = _pool()
    clusters[0] = 99  # a one-document cluster: floor gives it nothing, ceil its only document
    sizes = np.bincount(clusters)
    budgets = sel.cluster_budgets(sizes, 0.5, rounding)
    picked = sel.select_in_clusters(h, u, clusters, budgets, 1.0, 1.0)
    assert len(set(picked.rows)) == len(picked) == budgets.sum()
    assert np.array_equal(np.bincount(picked.cluster, minlength=len(sizes)), budgets)
    assert np.all(clusters[picked.rows] == picked.cluster)
    assert budgets[99] == (0 if rounding == "floor" else 1)
    for cluster in np.unique(picked.cluster):
        assert picked.rank[picked.cluster == cluster].tolist() == list(range(budgets[cluster]))


def test_t13_gram_batches_equal_the_reference_loop():
    h, u, clusters = _pool(n=600, clusters=9)
    budgets = sel.cluster_budgets(np.bincount(clusters), 0.5)
    reference = sel.select_reference_loop(h, u, clusters, budgets, 1.3, 0.8)
    for max_elements in (1 << 25, 5_000, 10):  # one batch, several, and the no-Gram fallback
        ours = sel.select_in_clusters(h, u, clusters, budgets, 1.3, 0.8, max_elements=max_elements)
        assert np.array_equal(ours.rows, reference.rows)
        assert np.allclose(ours.predicted, reference.predicted, atol=1e-5)


def test_t14_one_cluster_equals_full_greedy():
    h, u, _ = _pool(n=300)
    picked = sel.select_in_clusters(h, u, np.zeros(300, dtype=np.int64), {0: 120}, 0.9, 1.2)
    assert np.array_equal(picked.rows, sel.full_greedy(h, u, 120, 0.9, 1.2))


def test_t15_input_order_does_not_change_the_selected_set():
    h, u, clusters = _pool()
    budgets = sel.cluster_budgets(np.bincount(clusters), 0.5)
    base = sel.select_in_clusters(h, u, clusters, budgets, 1.0, 1.0)
    perm = np.random.default_rng(5).permutation(len(u))
    shuffled = sel.select_in_clusters(h[perm], u[perm], clusters[perm], budgets, 1.0, 1.0)
    assert set(perm[shuffled.rows]) == set(base.rows)


def test_t16_selected_documents_have_lower_mean_u():
    h, u, clusters = _pool()
    picked = sel.select_in_clusters(h, u, clusters, sel.cluster_budgets(np.bincount(clusters), 0.5), 1.0, 1.0)
    assert u[picked.rows].mean() < u.mean()


def test_determinism_and_empty_input():
    h, u, clusters = _pool()
    budgets = sel.cluster_budgets(np.bincount(clusters), 0.5)
    a = sel.select_in_clusters(h, u, clusters, budgets, 1.0, 1.0)
    b = sel.select_in_clusters(h, u, clusters, budgets, 1.0, 1.0)
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.predicted, b.predicted)
    empty = sel.select_in_clusters(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), {}, 1.0, 1.0)
    assert len(empty) == 0


def test_low_precision_working_dtype_returns_float32_scores():
    """bfloat16 (a natural GPU choice) has no NumPy dtype: the CPU Gram falls back to torch and the predicted
    scores leave as float32; torch inputs work as NumPy ones do."""
    import torch

    h, u, clusters = _pool()
    budgets = sel.cluster_budgets(np.bincount(clusters), 0.5)
    low = sel.select_in_clusters(torch.from_numpy(h), torch.from_numpy(u), clusters, budgets, 1.0, 1.0,
                                 dtype=torch.bfloat16)
    assert low.predicted.dtype == np.float32 and np.isfinite(low.predicted).all()
    assert np.array_equal(np.bincount(low.cluster, minlength=len(budgets)), budgets)
    assert len(set(low.rows.tolist())) == len(low)


def test_budget_and_cluster_count_validation():
    with pytest.raises(ValueError, match="ratio"):
        sel.cluster_budgets(np.array([4]), 0.0)
    with pytest.raises(ValueError, match="ratio"):
        sel.cluster_budgets(np.array([4]), 1.5)
    with pytest.raises(ValueError, match="rounding"):
        sel.cluster_budgets(np.array([4]), 0.5, "round")
    assert sel.cluster_budgets(np.array([1, 2, 3, 5]), 0.5).tolist() == [0, 1, 1, 2]
    assert sel.cluster_budgets(np.array([1, 2, 3, 5]), 0.5, "ceil").tolist() == [1, 1, 2, 3]
    assert sel.clusters_for(29_478_616, 2_948) == 10_000
    assert sel.clusters_for(5, 100) == 1
    with pytest.raises(ValueError, match="no documents"):
        sel.clusters_for(0, 10)
    h, u, clusters = _pool()
    with pytest.raises(ValueError, match="budget"):
        sel.select_in_clusters(h, u, clusters, np.full(10, 10_000), 1.0, 1.0)


def test_baselines():
    scores = np.array([0.3, -1.0, 0.3, 2.0])
    assert sel.top_k(scores, 2, lowest=True).tolist() == [1, 0]
    assert sel.top_k(scores, 2, lowest=False).tolist() == [3, 0]
    picked = sel.random_subset(100, 10, seed=3)
    assert len(set(picked)) == 10 and np.array_equal(picked, sel.random_subset(100, 10, seed=3))


def test_spherical_kmeans_is_seeded_and_assigns_to_the_nearest_centroid():
    rng = np.random.default_rng(0)
    centers = np.eye(8, dtype=np.float32)[:4]
    points = np.repeat(centers, 50, axis=0) + 0.05 * rng.normal(size=(200, 8)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    a = clustering.train_spherical_kmeans(points, 4, iterations=10, seed=1, threads=1)
    b = clustering.train_spherical_kmeans(points, 4, iterations=10, seed=1, threads=1)
    assert np.array_equal(a.centroids, b.centroids)
    assert np.allclose(np.linalg.norm(a.centroids, axis=1), 1.0, atol=1e-5)
    clusters, similarity = clustering.assign(points, a.centroids)
    assert np.array_equal(clusters, np.argmax(points @ a.centroids.T, axis=1))
    assert np.allclose(similarity, np.max(points @ a.centroids.T, axis=1), atol=1e-5)
    assert len(np.unique(clusters)) == 4 and np.all(np.bincount(clusters) == 50)
    with pytest.raises(ValueError, match="cannot form"):
        clustering.train_spherical_kmeans(points[:3], 4, iterations=2, seed=0)
