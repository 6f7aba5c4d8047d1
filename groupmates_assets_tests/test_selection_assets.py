"""The selection stage's assets materialized with Dagster on a small filtered pool with saved influence models:
an empty shard, clusters, exact budgets, baselines at the same budget, and corpora joined by doc_id."""

from __future__ import annotations

import hashlib
import io
import json

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zstandard

from groupmates_assets import settings as settings_module
from groupmates_assets.defs.partitions import pool_shards, selection_range_keys
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.selection import assets as sa
from groupmates_assets.lib import composition, layout
from groupmates_assets.lib import selection as sel
from groupmates_assets.lib.corpus import read_selected_shard, write_selected_shard
from groupmates_assets.lib.selection import SELECTION_METHODS
from groupmates_assets.lib.shards import make_doc_id, text_hash
from groupmates_assets.lib.storage import Storage
from groupmates_assets.testing.pool_to_selection import save_influence_models, seed_influence_models
from groupmates_assets_tests.conftest import use_profile

pytestmark = pytest.mark.unit

KEYS = ["web-a", "web-b", "web-empty"]
PROFILE = "selection-test"
TOPICS = ["the heart pumps blood", "databases store rows in tables", "the orchestra played beethoven",
          "rain falls from clouds", "the striker scored a goal", "compilers translate source code"]
SOURCES = ["wiki", "web", "wiki"]
ASSETS = [sa.pool_predictions, sa.cluster_centroids, sa.cluster_assignments, sa.selected_documents,
          sa.selected_random, sa.selected_mates, sa.selected_fasttext, sa.selected_weighted, sa.selected_global,
          sa.selected_corpus]


def kept_table(key: str, count: int) -> pa.Table:
    texts = [f"{TOPICS[i % len(TOPICS)]} (document {i} of {key})" for i in range(count)]
    return pa.table({
        "doc_id": pa.array([make_doc_id(key, i + 1, t) for i, t in enumerate(texts)], pa.string()),
        "line": pa.array(range(1, count + 1), pa.int64()),
        "text": pa.array(texts, pa.large_string()), "quality_score": pa.array(np.linspace(0.1, 0.9, count),
                                                                            pa.float32()),
        "fields": pa.array([json.dumps({"url": f"https://example.org/{key}/{i}", "source": SOURCES[i % 3]})
                            for i in range(count)], pa.string()),
    })


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    ranges = len(selection_range_keys(1))
    use_profile(monkeypatch, settings_module.Profile(
        name=PROFILE, description="selection asset tests",
        selection=settings_module.SelectionProfile(mean_cluster_size=12, kmeans_iterations=5, cluster_ranges=ranges,
                                                   predict_batch_docs=16, torch_threads=1)))
    storage = Storage(str(tmp_path / "store"))
    save_influence_models(tmp_path / "models")
    seed_influence_models(storage, tmp_path / "models")
    shards = []
    for key, count in zip(KEYS, (40, 33, 0), strict=True):
        info = storage.write_parquet(f"filtered_pool/{key}/kept.parquet", kept_table(key, count))
        shards.append({"key": key, "kept": count, "path": info.path, "sha256": info.sha256})
    storage.write_json("filtered_pool/_manifest.json", {"shards": shards})
    storage.write_json("quality/classifier/current.json", {"version": "test"})
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(pool_shards.name, KEYS)
        yield {"platform": PlatformResource(storage_root=storage.root, profile=PROFILE), "instance": instance,
               "storage": storage, "root": tmp_path / "store"}


def _materialize(setup, name, partition_key=None):
    result = dg.materialize(ASSETS, selection=[name], partition_key=partition_key, instance=setup["instance"],
                            resources={"platform": setup["platform"]})
    return result.asset_materializations_for_node(name)[0].metadata, result.get_asset_check_evaluations()


def _read_corpus(path) -> list[dict]:
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read().decode()
    return [json.loads(line) for line in data.splitlines()]


def test_selection_stage_end_to_end(setup):
    for key in KEYS:
        metadata, _ = _materialize(setup, "pool_predictions", key)
        assert metadata["documents"].value == {"web-a": 40, "web-b": 33, "web-empty": 0}[key]
    centroids, _ = _materialize(setup, "cluster_centroids")
    assert centroids["clusters"].value == 7 and centroids["documents"].value == 73  # ceil(73 / 12)
    for key in KEYS:
        _materialize(setup, "cluster_assignments", key)
    metadata, checks = _materialize(setup, "selected_documents", selection_range_keys(1)[0])
    assert all(c.passed for c in checks if c.check_name == "budgets_exact")
    selected = metadata["selected"].value
    assert 0 < selected <= 73 // 2 + 1
    assert metadata["sha256"].value == _todays_group_mates_sha256(setup)  # the uniform policy, byte for byte
    for name in ("selected_random", "selected_mates", "selected_fasttext", "selected_weighted", "selected_global"):
        baseline, checks = _materialize(setup, name)
        assert baseline["selected"].value == selected, name  # every method at the same budget
        assert all(c.passed for c in checks), name
    texts = {}
    for key in KEYS:
        metadata, checks = _materialize(setup, "selected_corpus", key)
        assert checks[0].passed, checks[0].metadata
        assert metadata["lineage"].value["influence_model_final"]["fingerprint"] == "fp-final"
        for method in SELECTION_METHODS:
            for record in _read_corpus(setup["root"] / "selected_corpus" / method / f"{key}.jsonl.zst"):
                digest = hashlib.blake2b(record["text"].encode(), digest_size=8).hexdigest()
                assert record["doc_id"].endswith(digest) and record["url"].startswith("https://example.org/")
                texts.setdefault(method, []).append(record["doc_id"])
    assert {m: len(ids) for m, ids in texts.items()} == dict.fromkeys(SELECTION_METHODS, selected)
    _assert_corpus_reads_only_its_shard(setup)
    fasttext = set(texts["fasttext"])
    best = [make_doc_id("web-a", 40, f"{TOPICS[39 % 6]} (document 39 of web-a)")]
    assert set(best) <= fasttext  # the highest quality score is kept by the fastText baseline
    assert _read_corpus(setup["root"] / "selected_corpus" / "group_mates" / "web-empty.jsonl.zst") == []
    shards = [pq.read_table(setup["root"] / "selected_corpus" / "_composition" / f"{key}.parquet") for key in KEYS]
    counts = composition.total_composition(shards)
    assert _sums(counts, "method") == {"pool": 73, **dict.fromkeys(SELECTION_METHODS, selected)}
    pool = counts.filter(pc.equal(counts.column("method"), "pool"))
    assert _sums(pool, "source") == {"wiki": 27 + 22, "web": 13 + 11}  # every third document of each shard is web


def _sums(table: pa.Table, key: str) -> dict:
    summed = table.group_by(key).aggregate([("documents", "sum")])
    return dict(zip(summed.column(key).to_pylist(), summed.column("documents_sum").to_pylist(), strict=True))


def _todays_group_mates_sha256(setup) -> str:
    """The digest of the per-shard files selected_documents writes when the greedy runs with the uniform budgets
    themselves (one range: every cluster)."""
    storage, settings = setup["storage"], setup["platform"].settings().selection
    keys, k = layout.filtered_shards(storage), layout.current_clusters(storage)["k"]
    assignments = sa.read_assignments(storage, keys)
    budgets = sel.cluster_budgets(sel.cluster_sizes(list(assignments.values()), k), settings.ratio,
                                  settings.budget_rounding)
    candidates = sel.gather_candidates(assignments, sa.read_predictions(storage, keys, ["doc_id", "h", "u"]), 0, k)
    alpha, tau = sa.alpha_tau(storage, settings)
    today = sel.select_in_clusters(candidates.h, candidates.u, candidates.cluster, budgets, alpha, tau)
    return sa.write_by_shard(storage, "today/group_mates", "today/group_mates.json",
                             sel.selected_table(candidates, today), keys, {})


def _assert_corpus_reads_only_its_shard(setup):
    """Each corpus shard reads its own rows of every selection (one file per range and per baseline), and writes
    the same bytes as from every method's whole selection at once (the earlier layout)."""
    storage, settings = setup["storage"], setup["platform"].settings().selection
    files = sa.selection_files(storage, settings, settings.cluster_ranges)
    own = {key: files.of_shard(storage, key) for key in KEYS}
    for key, tables in own.items():
        assert all(set(t.column("shard").to_pylist()) <= {key} for t in tables.values())
    whole = {m: pa.concat_tables([own[key][m] for key in KEYS]) for m in SELECTION_METHODS}
    for key in KEYS:
        kept = storage.read_parquet(f"filtered_pool/{key}/kept.parquet")
        hashes = dict(zip(kept.column("doc_id").to_pylist(), map(text_hash, kept.column("text").to_pylist()),
                          strict=True))
        for method in SELECTION_METHODS:
            data = write_selected_shard(kept, whole[method], method, key, hashes).data
            assert data == (setup["root"] / "selected_corpus" / method / f"{key}.jsonl.zst").read_bytes()
            position = {doc_id: i for i, doc_id in enumerate(kept.column("doc_id").to_pylist())}
            written = [position[doc_id] for doc_id, _ in read_selected_shard(data, key)]
            assert written == sorted(written), method  # the shard's order, not the clusters' (packing mixes them)


def test_a_range_reads_only_its_clusters_rows_and_ranges_select_as_one(setup, monkeypatch):
    """Three range partitions over assignments cut for three ranges: each reads exactly its own clusters' rows of
    every shard (the row groups it reads hold nothing else), and together they select what one range over all
    clusters selects, row for row."""
    for key in KEYS:
        _materialize(setup, "pool_predictions", key)
    _materialize(setup, "cluster_centroids")
    storage, settings = setup["storage"], setup["platform"].settings().selection
    current = layout.current_clusters(storage)
    centroids = np.asarray(storage.read_numpy(f"selection/clusters/{current['fingerprint']}/centroids.npy"))
    for key in KEYS:
        sa.assign_shard(storage, current, centroids, sel.all_range_bounds(current["k"], 3), key)
    read = []
    original = pq.ParquetFile.read_row_groups

    def counting(self, row_groups, *args, **kwargs):
        table = original(self, row_groups, *args, **kwargs)
        read.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    parts = []
    for range_key in selection_range_keys(3):
        read.clear()
        part = sa.select_range(storage, settings, range_key)
        assert sum(read) == len(part.candidates) > 0 and len(read) <= 2  # web-empty has no row group
        assert part.checks.budgets_exact
        parts.append(part.table)
    read.clear()
    whole = sa.select_range(storage, settings, selection_range_keys(1)[0])
    assert sum(read) == len(whole.candidates) == 73
    together = pa.concat_tables(parts)
    for column in ("doc_id", "shard", "cluster", "rank"):
        assert together.column(column).equals(whole.table.column(column)), column
    for column in ("u", "predicted"):  # padded batches of other widths: float32 may differ in the last bit
        assert np.allclose(together.column(column).to_numpy(), whole.table.column(column).to_numpy(), rtol=1e-5)


def test_missing_predictions_are_named(setup):
    with pytest.raises(Exception, match="pool_predictions is missing for shards web-a, web-b, web-empty"):
        _materialize(setup, "cluster_centroids")


def test_t17_index_round_trip_fires_on_misaligned_embeddings_and_missing_ids(setup):
    """The selected_corpus check, fed what T17 guards against: predictions embedded under the wrong doc_ids (a
    listing misaligned with the texts) and a selected id the shard does not hold."""
    storage = setup["storage"]
    settings = setup["platform"].settings().selection
    kept = storage.read_parquet("filtered_pool/web-a/kept.parquet")
    ids, texts = kept.column("doc_id").to_pylist(), kept.column("text").to_pylist()
    hashes = [text_hash(t) for t in texts]

    def round_trip(embedded_hashes: list[str], selected: list[str]) -> tuple[bool | None, dict]:
        storage.write_parquet(sa.predictions_path(storage, "web-a"),
                              pa.table({"doc_id": ids, "text_hash": embedded_hashes}))
        table = pa.table({"doc_id": selected, "shard": ["web-a"] * len(selected), "rank": range(len(selected))})
        result = sa.write_corpus_shard(storage, settings, dict.fromkeys(SELECTION_METHODS, table), {}, "web-a")
        return result.check_passed, result.check_metadata

    assert round_trip(hashes, ids[:5]) == (True, {"ids_not_found": 0, "text_hash_mismatches": 0})
    passed, found = round_trip(hashes[1:] + hashes[:1], ids[:5])  # each text embedded under its neighbour's id
    assert not passed and found["text_hash_mismatches"] == 5 * len(SELECTION_METHODS)
    passed, found = round_trip(hashes, [*ids[:4], make_doc_id("web-a", 999, "never in the pool")])
    assert not passed and found == {"ids_not_found": len(SELECTION_METHODS), "text_hash_mismatches": 0}


def test_mates_temperature_samples_only_the_mates_baseline_and_versions_its_path():
    settings = settings_module.SelectionProfile(mates_temperature=0.5)
    mates, random = SELECTION_METHODS["mates"], SELECTION_METHODS["random"]
    assert sa.baseline_temperature(mates, settings) == 0.5 and sa.baseline_temperature(random, settings) == 0.0
    assert sa.baseline_temperature(mates, settings_module.SelectionProfile()) == 0.0  # default: top-k
    assert sa.baseline_dir("fp", "mates", 0, 0.5) != sa.baseline_dir("fp", "mates", 0, 0.0)
    assert sa.baseline_dir("fp", "mates", 0, 0.0) == sa.baseline_dir("fp", "mates", 0)  # top-k paths unchanged
    with pytest.raises(ValueError, match=r"selection\.mates_temperature"):
        settings_module.SelectionProfile(mates_temperature=-0.1)
