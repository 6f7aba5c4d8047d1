"""Cluster-based greedy group selection: invariants T3, T4, T12-T16 (the quality_signal check shown to fire) and the
baselines."""

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from groupmates_assets.defs.partitions import SELECTION_METHODS, selection_methods, selection_range_keys
from groupmates_assets.defs.selection.assets import _range_check_results
from groupmates_assets.lib import clustering
from groupmates_assets.lib import selection as sel
from groupmates_assets.lib.shards import make_doc_id, text_hash
from groupmates_assets.lib.storage import Storage, overlapping_row_groups

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


def test_t16_quality_signal_check_fires_when_the_sign_convention_is_inverted():
    """The check the selected_documents asset reports, fed a selection made with u's sign flipped (beneficial read
    as harmful): it must fail there and pass on the right one."""
    h, u, clusters = _pool()
    budgets = sel.cluster_budgets(np.bincount(clusters), 0.5)
    candidates = sel.Candidates(doc_id=np.array([f"s:{i:04d}" for i in range(len(u))], dtype=object),
                                shard=np.array(["s"] * len(u), dtype=object), cluster=clusters, h=h, u=u)

    def quality_signal(selection: sel.ClusterSelection):
        checks = sel.check_range(candidates, selection, budgets, 0, len(budgets))
        return next(r for r in _range_check_results(checks, len(selection)) if r.check_name == "quality_signal")

    assert quality_signal(sel.select_in_clusters(h, u, clusters, budgets, 1.0, 1.0)).passed
    inverted = quality_signal(sel.select_in_clusters(h, -u, clusters, budgets, 1.0, 1.0))
    assert not inverted.passed
    assert inverted.metadata["mean_u_selected"].value > inverted.metadata["mean_u_candidates"].value


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
    ids = [f"d{i:03d}" for i in range(100)]
    draws = sel.doc_uniforms(ids, seed=3)
    assert np.all((draws > 0) & (draws < 1)) and np.array_equal(draws, sel.doc_uniforms(ids, seed=3))
    assert len(np.unique(draws)) == 100 and not np.array_equal(draws, sel.doc_uniforms(ids, seed=4))
    assert np.array_equal(sel.doc_uniforms(ids[::-1], seed=3), draws[::-1])  # a document's draw is its own


def test_random_draws_are_uniform():
    """Each document's seeded draw is uniform on (0, 1) and independent of the next: over 20,000 ids the ten
    deciles hold 2,000 each within 4.5 standard deviations, and a random baseline of 10% picks each of 200
    documents in about 10% of 300 seeds."""
    draws = sel.doc_uniforms([f"shard-{i % 7}:{i}:{i * 7919:016x}" for i in range(20_000)], seed=0)
    deciles = np.bincount((draws * 10).astype(int), minlength=10)
    assert np.all(np.abs(deciles - 2_000) < 4.5 * np.sqrt(20_000 * 0.1 * 0.9)), deciles
    assert abs(np.corrcoef(draws[:-1], draws[1:])[0, 1]) < 0.03
    ids = [f"d{i:03d}" for i in range(200)]
    pool = sel.ScoredPool(ids, ["s"] * 200, np.zeros(200))
    picked = np.zeros(200)
    for seed in range(300):
        picked[sel.select_baseline(sel.SELECTION_METHODS["random"], pool, 20, seed)] += 1
    assert abs(picked.mean() / 300 - 0.1) < 1e-12 and picked.min() > 5 and picked.max() < 60


def test_gumbel_top_k_is_seeded_picks_k_distinct_and_spans_top_k_to_uniform():
    scores = np.random.default_rng(0).permutation(200).astype(np.float64)  # gaps of 1: no ties
    ids = [f"d{i:03d}" for i in range(200)]

    def gumbel_top_k(values, temperature, seed, lowest=True):
        return sel.top_k(sel.gumbel_keys(values, ids, temperature, seed, lowest), 20, lowest=True)

    top = sel.top_k(scores, 20, lowest=True)
    sampled = gumbel_top_k(scores, 5.0, seed=1)
    assert len(sampled) == len(set(sampled.tolist())) == 20
    assert np.array_equal(sampled, gumbel_top_k(scores, 5.0, seed=1))
    assert not np.array_equal(sampled, gumbel_top_k(scores, 5.0, seed=2))
    assert np.array_equal(gumbel_top_k(scores, 0.0, seed=1), top)
    assert np.array_equal(gumbel_top_k(scores, 1e-9, seed=1), top)  # the limit T -> 0
    hot = gumbel_top_k(scores, 1e4, seed=1)
    assert len(set(hot.tolist()) & set(top.tolist())) < 10  # nearly uniform: top-k's 20 are not what it picks
    assert scores[sampled].mean() < scores[hot].mean()  # a moderate temperature still favours low scores
    assert np.array_equal(gumbel_top_k(-scores, 1e-9, seed=1, lowest=False), sel.top_k(-scores, 20, False))
    with pytest.raises(ValueError, match="temperature"):
        sel.gumbel_keys(scores, ids, -1.0, seed=1)


def test_mates_baseline_samples_by_gumbel_top_k_only_when_asked():
    rng = np.random.default_rng(4)
    ids = [f"d{i:03d}" for i in range(100)]
    table = pa.table({"doc_id": ids, "u_individual": pa.array(rng.normal(size=100), pa.float32())})
    pool = sel.scored_pool({"s": table}, "u_individual")
    shuffled = sel.scored_pool({"s": table.take(rng.permutation(100))}, "u_individual")
    mates, fasttext = sel.SELECTION_METHODS["mates"], sel.SELECTION_METHODS["fasttext"]
    deterministic = sel.select_baseline(mates, pool, 30, seed=0)
    assert np.array_equal(deterministic, sel.top_k(pool.scores, 30, lowest=True))  # the default: top-k
    sampled = sel.select_baseline(mates, pool, 30, seed=0, temperature=1.0)
    assert len(set(sampled.tolist())) == 30 and set(sampled.tolist()) != set(deterministic.tolist())
    assert [pool.doc_ids[i] for i in sampled] == [shuffled.doc_ids[i] for i in sel.select_baseline(
        mates, shuffled, 30, seed=0, temperature=1.0)]  # the noise follows doc_id, not the input order
    with pytest.raises(ValueError, match="no sampling temperature"):
        sel.select_baseline(fasttext, pool, 30, seed=0, temperature=1.0)


def test_range_keys_split_the_cluster_ids_without_gaps():
    for ranges, k in ((1, 5), (3, 10), (4, 2), (7, 7)):
        bounds = [sel.range_bounds(key, k) for key in selection_range_keys(ranges)]
        assert bounds[0][0] == 0 and bounds[-1][1] == k
        assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(bounds))
    assert sel.range_bounds("clusters-002-of-003", 10) == (6, 10)
    for key in ("clusters-1-of", "cluster-000-of-002", "clusters-000-from-002", "clusters-00x-of-002", ""):
        with pytest.raises(ValueError, match="not a cluster range key"):
            sel.range_bounds(key, 4)


def test_cluster_sizes_and_total_budget():
    tables = [pa.table({"cluster": pa.array([0, 2, 2], pa.int64())}), pa.table({"cluster": pa.array([2], pa.int64())})]
    sizes = sel.cluster_sizes(tables, 4)
    assert sizes.tolist() == [1, 0, 3, 0]
    assert sel.cluster_sizes(iter(tables), 4).tolist() == [1, 0, 3, 0]  # a generator: one shard at a time
    assert sel.cluster_sizes([], 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="cluster id 2 outside the 2 clusters"):
        sel.cluster_sizes(tables, 2)
    assert sel.total_budget(sizes, 0.5) == 1 and sel.total_budget(sizes, 0.5, "ceil") == 3
    assert sel.total_budget(sizes, 0.5) == int(sel.cluster_budgets(sizes, 0.5).sum())


def test_method_registry_is_the_partition_keys():
    assert list(sel.SELECTION_METHODS) == ["group_mates", "group_mates_weighted", "group_mates_global", "random",
                                           "mates", "fasttext"]
    assert tuple(sel.SELECTION_METHODS) == SELECTION_METHODS
    assert selection_methods.get_partition_keys() == list(sel.SELECTION_METHODS)
    assert [m.name for m in sel.baseline_methods()] == ["random", "mates", "fasttext"]
    assert [m.name for m in sel.policy_methods()] == ["group_mates_weighted", "group_mates_global"]
    assert {m.asset for m in sel.SELECTION_METHODS.values()} == {
        "selected_documents", "selected_weighted", "selected_global", "selected_random", "selected_mates",
        "selected_fasttext"}
    assert sel.SELECTION_METHODS["group_mates"].policy == "uniform"  # the paper's Group-MATES is the uniform policy
    assert [sel.SELECTION_METHODS[m].policy for m in ("group_mates_weighted", "group_mates_global")] == [
        "influence_weighted", "global"]
    assert not sel.SELECTION_METHODS["group_mates"].is_baseline
    with pytest.raises(ValueError, match="registered twice"):
        sel.register_method(sel.SELECTION_METHODS["random"])
    with pytest.raises(ValueError, match="not a baseline"):
        sel.select_baseline(sel.SELECTION_METHODS["group_mates"], sel.ScoredPool([], [], np.zeros(0)), 0, 0)


def test_baselines_pick_by_doc_id_not_input_order():
    tables = {"b": pa.table({"doc_id": ["b2", "b1"], "u_individual": pa.array([0.5, -1.0], pa.float32())}),
              "a": pa.table({"doc_id": ["a1"], "u_individual": pa.array([0.5], pa.float32())})}
    pool = sel.scored_pool(tables, "u_individual")
    assert pool.doc_ids == ["b2", "b1", "a1"] and pool.shards == ["b", "b", "a"]
    mates, fasttext, random = (sel.SELECTION_METHODS[name] for name in ("mates", "fasttext", "random"))
    lowest = sel.select_baseline(mates, pool, 2, seed=0)
    assert [pool.doc_ids[i] for i in lowest] == ["b1", "a1"]  # the tie at 0.5 goes to the smaller doc_id
    assert [pool.doc_ids[i] for i in sel.select_baseline(fasttext, pool, 1, seed=0)] == ["a1"]
    shuffled = sel.scored_pool({"a": tables["a"], "b": tables["b"]}, "u_individual")
    assert sorted(shuffled.doc_ids[i] for i in sel.select_baseline(random, shuffled, 2, seed=5)) == sorted(
        pool.doc_ids[i] for i in sel.select_baseline(random, pool, 2, seed=5))
    table = sel.baseline_table(mates, pool, lowest)
    assert table.column_names == ["doc_id", "shard", "rank", "score"]
    assert table.to_pydict() == {"doc_id": ["b1", "a1"], "shard": ["b", "a"], "rank": [0, 1], "score": [-1.0, 0.5]}
    assert sel.baseline_table(random, pool, lowest).column("score").to_pylist() == [0.0, 0.0]


def _pool_shards(seed: int, shards: int = 5, per_shard: int = 300) -> dict[str, pa.Table]:
    """Shards of doc_id, u_individual and quality_score with many exact ties (scores on a coarse grid), ids in
    no particular order."""
    rng = np.random.default_rng(seed)
    tables = {}
    for s in range(shards):
        ids = [f"web-{s}:{i}:{rng.integers(1 << 60):016x}" for i in rng.permutation(per_shard)]
        tables[f"web-{s}"] = pa.table({
            "doc_id": pa.array(ids, pa.string()),
            "u_individual": pa.array(np.round(rng.normal(size=per_shard), 1), pa.float32()),
            "quality_score": pa.array(np.round(rng.uniform(size=per_shard), 2), pa.float32())})
    return tables


@pytest.mark.parametrize("name,temperature", [("fasttext", 0.0), ("mates", 0.0), ("mates", 0.7), ("random", 0.0)])
@pytest.mark.parametrize("budget", [0, 1, 137, 750, 1500])
def test_streamed_baselines_equal_the_whole_pool(name, temperature, budget):
    """The baselines the assets run (two passes over the shards, at most 2 x budget keys held) pick the same rows
    in the same order as the whole pool sorted at once, ties at the cut included; the same for any shard layout
    and shard order."""
    method = sel.SELECTION_METHODS[name]
    tables = _pool_shards(seed=budget)
    pool = sel.scored_pool(tables, method.score_column)
    expected = sel.baseline_table(method, pool, sel.select_baseline(method, pool, budget, 11, temperature))
    streamed = sel.stream_baseline(method, lambda: iter(tables.items()), budget, 11, temperature)
    assert streamed.table.equals(expected) and streamed.pool == 1500
    assert streamed.mean_score_pool == pytest.approx(float(np.mean(pool.scores)))
    regrouped = pa.concat_tables(tables.values()).take(np.random.default_rng(3).permutation(1500))
    other_layout = {f"part-{i}": regrouped.slice(i * 100, 100) for i in reversed(range(15))}
    again = sel.stream_baseline(method, lambda: iter(other_layout.items()), budget, 11, temperature)
    assert again.table.column("doc_id").equals(expected.column("doc_id"))
    with pytest.raises(ValueError, match="a budget of 1,501 documents from a pool of 1,500"):
        sel.stream_baseline(method, lambda: iter(tables.items()), 1501, 11, temperature)


def test_split_by_shard_keeps_each_shards_order():
    table = pa.table({"doc_id": ["x", "y", "z", "w"], "shard": ["b", "a", "b", "a"], "rank": [0, 1, 2, 3]})
    parts = sel.split_by_shard(table, ["a", "b", "c"])
    assert {k: v.column("doc_id").to_pylist() for k, v in parts.items()} == {"a": ["y", "w"], "b": ["x", "z"],
                                                                              "c": []}
    assert parts["c"].schema == table.schema
    with pytest.raises(ValueError, match="not in the filtered pool"):
        sel.split_by_shard(table, ["a"])


def test_sorted_assignments_are_cut_into_one_row_group_per_cluster_range(tmp_path):
    """cluster_assignments' layout: sorted by cluster, a row group per range; a range's read touches only its own
    group (the others are never read) and returns exactly its rows."""
    rng = np.random.default_rng(0)
    k, ranges = 10, 4
    table = sel.sorted_by_cluster(pa.table({"doc_id": [f"s:{i:03d}" for i in range(200)],
                                            "cluster": pa.array(rng.integers(0, k, 200), pa.int64())}))
    clusters = table.column("cluster").to_numpy()
    assert np.all(np.diff(clusters) >= 0)
    bounds = sel.all_range_bounds(k, ranges)
    assert bounds == [sel.range_bounds(key, k) for key in selection_range_keys(ranges)]
    groups = sel.range_row_groups(clusters, bounds)
    assert groups == [int(((clusters >= a) & (clusters < b)).sum()) for a, b in bounds]
    storage = Storage(str(tmp_path))
    storage.write_parquet("a.parquet", table, row_group_sizes=groups)
    assert storage.parquet_rows("a.parquet") == 200
    metadata = pq.read_metadata(tmp_path / "a.parquet")
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == groups
    for index, (start, stop) in enumerate(bounds):
        assert _row_groups_of(storage, "a.parquet", start, stop) == [index]
        rows = storage.read_parquet_where("a.parquet", "cluster", start, stop - 1, columns=["doc_id"])
        assert rows.column_names == ["doc_id"]
        in_range = pc.and_(pc.greater_equal(table.column("cluster"), start), pc.less(table.column("cluster"), stop))
        assert rows.column("doc_id").to_pylist() == table.filter(in_range).column("doc_id").to_pylist()
    assert storage.read_parquet_where("a.parquet", "cluster", 3, 3).column("cluster").to_pylist() == [3] * int(
        (clusters == 3).sum())
    assert storage.read_parquet_where("a.parquet", "cluster", 50, 60).num_rows == 0
    with pytest.raises(ValueError, match="do not cut a table"):
        storage.write_parquet("b.parquet", table, row_group_sizes=[100, 99])


def _row_groups_of(storage, path: str, start: int, stop: int) -> list[int]:
    with storage.open_read(path) as handle:
        return overlapping_row_groups(pq.ParquetFile(handle).metadata, "cluster", start, stop - 1)


def _assignments_and_predictions():
    h = np.eye(3, dtype=np.float16)
    predictions = {"s": pa.table({"doc_id": ["s:3", "s:1", "s:2"],
                                  "h": pa.FixedSizeListArray.from_arrays(pa.array(h.reshape(-1)), 3),
                                  "u": pa.array([-3.0, -1.0, -2.0], pa.float32())})}
    assignments = {"s": pa.table({"doc_id": ["s:1", "s:2", "s:3"], "cluster": pa.array([0, 1, 0], pa.int64())})}
    return assignments, predictions


def test_candidates_of_a_range_are_joined_by_doc_id_and_sorted():
    assignments, predictions = _assignments_and_predictions()
    candidates = sel.gather_candidates(assignments, predictions, 0, 1)
    assert candidates.doc_id.tolist() == ["s:1", "s:3"] and candidates.shard.tolist() == ["s", "s"]
    assert candidates.u.tolist() == [-1.0, -3.0] and candidates.h.tolist() == [[0, 1, 0], [1, 0, 0]]
    assert len(sel.gather_candidates(assignments, predictions, 2, 3)) == 0
    result = sel.select_in_clusters(candidates.h, candidates.u, candidates.cluster, np.array([1, 1]), 1.0, 1.0)
    table = sel.selected_table(candidates, result)
    assert table.column_names == ["doc_id", "shard", "cluster", "rank", "u", "predicted"]
    assert table.column("doc_id").to_pylist() == ["s:3"]
    checks = sel.check_range(candidates, result, np.array([1, 1]), 0, 1)
    assert checks.budgets_exact and checks.budget == 1 and checks.duplicate_ids == 0 and checks.quality_signal
    off = sel.check_range(candidates, result, np.array([2, 1]), 0, 1)
    assert not off.budgets_exact and off.clusters_off_budget == 1
    missing = {"s": predictions["s"].slice(0, 2)}
    with pytest.raises(ValueError, match="shard s: 1 assigned documents have no prediction"):
        sel.gather_candidates(assignments, missing, 0, 2)
    own = {"s": sel.sorted_by_cluster(assignments["s"].append_column("h", predictions["s"].take([1, 2, 0]).column(
        "h")).append_column("u", predictions["s"].take([1, 2, 0]).column("u")))}  # h, u carried by the assignments
    carried = sel.gather_candidates(own, None, 0, 1)
    assert carried.doc_id.tolist() == candidates.doc_id.tolist() and carried.u.tolist() == candidates.u.tolist()
    assert np.array_equal(carried.h, candidates.h)


def test_one_text_hash_for_doc_ids_and_joins():
    assert make_doc_id("web-a", 7, "caf\u00e9").endswith(":" + text_hash("caf\u00e9"))
    assert len(text_hash("x")) == 16 and text_hash("x") != text_hash("y")


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
