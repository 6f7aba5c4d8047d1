"""Filtering one shard: reconciliation, outputs, reruns, kills."""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq
import pytest

from groupmates_assets.lib import filtering, quality, shards
from groupmates_assets.lib.storage import Storage
from groupmates_assets_tests.conftest import bad_texts, good_texts, jsonl_bytes, records, write_shard

pytestmark = pytest.mark.unit

FS = fsspec.filesystem("file")


@pytest.fixture
def classifier(tmp_path):
    path = str(tmp_path / "model.bin")
    quality.train_quality_classifier(good_texts(200), bad_texts(200), path, quality.FastTextRecipe(epoch=10))
    return quality.QualityClassifier(path)


def _shard(tmp_path):
    data = jsonl_bytes(records(30, 30)) + b'{"text": 5}\n\n{"url": "x"}\n' + jsonl_bytes(records(5, 5, 500))
    path = write_shard(tmp_path / "pool" / "s-0.jsonl.zst", data)
    return shards.ShardFile("s-0", str(path), "s-0.jsonl.zst", "jsonl.zst", path.stat().st_size)


def test_filter_reconciles_and_writes_every_output(tmp_path, classifier):
    storage, shard = Storage(str(tmp_path / "store")), _shard(tmp_path)
    stats = filtering.filter_shard(shard, FS, classifier, 0.5, storage, "out/s-0", batch_size=16)
    assert stats["rows_in"] == 73 == stats["kept"] + stats["dropped"] + stats["rejected"] + stats["heldout"]
    assert stats["rejected"] == 3 and stats["kept"] == 35 and stats["dropped"] == 35 and stats["heldout"] == 0
    assert stats["by_group"] == {"prose": {"in": 35, "kept": 35, "heldout": 0},
                                 "spam": {"in": 35, "kept": 0, "heldout": 0}}
    assert sum(stats["score_histogram"]["counts"]) == 70
    kept = storage.read_parquet("out/s-0/kept.parquet")
    assert kept.column("doc_id").to_pylist()[0] == shards.make_doc_id("s-0", 1, good_texts(1)[0])
    assert min(kept.column("quality_score").to_pylist()) >= 0.5
    rejects = storage.read_parquet("out/s-0/rejects.parquet").to_pylist()
    assert [(r["line"], r["file"]) for r in rejects] == [(61, shard.path), (62, shard.path), (63, shard.path)]
    ok, details = filtering.verify_filtered_shard(storage, "out/s-0", filtering.count_source_records(FS, shard))
    assert ok and details["source_records"] == 73


def test_rerun_replaces_outputs_without_duplicates(tmp_path, classifier):
    storage, shard = Storage(str(tmp_path / "store")), _shard(tmp_path)
    first = filtering.filter_shard(shard, FS, classifier, 0.5, storage, "out/s-0")
    second = filtering.filter_shard(shard, FS, classifier, 0.5, storage, "out/s-0")
    assert first["files"] == second["files"]  # byte-identical outputs
    assert pq.ParquetFile(storage.path("out/s-0/kept.parquet")).metadata.num_rows == first["kept"]


def test_killed_run_leaves_no_completion_marker_and_old_outputs(tmp_path, classifier):
    storage, shard = Storage(str(tmp_path / "store")), _shard(tmp_path)
    filtering.filter_shard(shard, FS, classifier, 0.5, storage, "out/s-0")
    before = storage.read_bytes("out/s-0/kept.parquet")

    class Exploding:
        def score_normalized(self, texts):
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        filtering.filter_shard(shard, FS, Exploding(), 0.5, storage, "out/s-0")
    assert not storage.exists("out/s-0/stats.json")  # reads as incomplete
    assert storage.read_bytes("out/s-0/kept.parquet") == before
    assert sorted(storage.list("out/s-0")) == ["dropped.parquet", "heldout.parquet", "kept.parquet",
                                               "rejects.parquet"]


def test_verification_catches_missing_rows(tmp_path, classifier):
    storage, shard = Storage(str(tmp_path / "store")), _shard(tmp_path)
    filtering.filter_shard(shard, FS, classifier, 0.5, storage, "out/s-0")
    stats = storage.read_json("out/s-0/stats.json")
    stats["rows_in"] += 1
    storage.write_json("out/s-0/stats.json", stats)
    ok, _ = filtering.verify_filtered_shard(storage, "out/s-0")
    assert not ok
    ok, _ = filtering.verify_filtered_shard(storage, "out/s-0", source_records=stats["rows_in"] - 1)
    assert not ok


def test_source_recount_counts_truncated_tail_once(tmp_path):
    full = write_shard(tmp_path / "f.jsonl.gz", jsonl_bytes(records(3000, 3000))).read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(full[: len(full) // 2])
    shard = shards.ShardFile("c", str(tmp_path / "c.jsonl.gz"), "c.jsonl.gz", "jsonl.gz", 0)
    parsed = sum(b.records_in for b in shards.read_shard(FS, shard))
    assert filtering.count_source_records(FS, shard) == parsed


def _stats(key: str, kept: int, dropped: int, rejected: int, version: str = "v1", by_group=None,
           heldout: int = 0) -> dict:
    return {"shard_key": key, "rows_in": kept + dropped + rejected + heldout, "kept": kept, "dropped": dropped,
            "rejected": rejected, "heldout": heldout, "classifier_version": version, "threshold": 0.5,
            "score_histogram": {"bin_edges": [0.0, 0.5, 1.0], "counts": [dropped, kept]},
            "by_group": by_group or {}, "files": {"kept": {"path": f"{key}/kept.parquet", "sha256": key * 2}}}


def test_keep_rate_and_table():
    assert filtering.keep_rate(1, 2) == 0.3333 and filtering.keep_rate(0, 0) == 0.0
    table = filtering.keep_rate_table({"small": {"in": 2, "kept": 1}, "big": {"in": 10, "kept": 9}})
    assert table.splitlines() == ["| group | documents | kept | keep rate |", "|---|---:|---:|---:|",
                                  "| big | 10 | 9 | 90.0% |", "| small | 2 | 1 | 50.0% |"]
    held = filtering.keep_rate_table({"big": {"in": 10, "kept": 9, "heldout": 1}, "gone": {"in": 0, "kept": 0,
                                                                                          "heldout": 2}})
    assert held.splitlines()[2:] == ["| big | 10 | 9 | 90.0% | 1 |", "| gone | 0 | 0 | n/a | 2 |"]


def test_summarize_pool_merges_totals_histograms_and_groups():
    summary = filtering.summarize_pool([
        _stats("a", 3, 1, 0, by_group={"wiki": {"in": 2, "kept": 2, "heldout": 1}, "web": {"in": 2, "kept": 1}},
               heldout=1),
        _stats("b", 2, 2, 1, by_group={"web": {"in": 4, "kept": 2}}),
    ])
    assert summary.totals == {"rows_in": 10, "kept": 5, "dropped": 3, "rejected": 1, "heldout": 1}
    assert summary.counts == [3, 5] and summary.bin_edges == [0.0, 0.5, 1.0] and summary.threshold == 0.5
    assert summary.by_group == {"wiki": {"in": 2, "kept": 2, "heldout": 1}, "web": {"in": 6, "kept": 3, "heldout": 0}}
    assert summary.reconciles and summary.unbalanced == [] and summary.classifier_versions == ["v1"]
    manifest = summary.manifest()
    assert list(manifest) == ["shards", "classifier_versions", "rows_in", "kept", "dropped", "rejected", "heldout"]
    assert manifest["shards"][0] == {"key": "a", "kept": 3, "path": "a/kept.parquet", "sha256": "aa"}


def test_summarize_pool_flags_unbalanced_shards_and_mixed_classifiers():
    bad = {**_stats("b", 2, 2, 0, version="v2"), "rows_in": 5}
    summary = filtering.summarize_pool([_stats("a", 1, 1, 0), bad])
    assert summary.unbalanced == ["b"] and summary.classifier_versions == ["v1", "v2"] and not summary.reconciles
    uncounted = {**_stats("h", 1, 1, 0, heldout=2), "heldout": 0}  # held-out rows must be counted to balance
    assert filtering.summarize_pool([uncounted]).unbalanced == ["h"]
    assert not filtering.summarize_pool([_stats("a", 1, 1, 0), _stats("c", 1, 1, 0, version="v2")]).reconciles


def test_read_shard_stats_lists_incomplete_shards_apart(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    storage.write_json(f"filtered_pool/a/{filtering.STATS_FILE}", _stats("a", 1, 0, 0))
    found, incomplete = filtering.read_shard_stats(storage, ["a", "b"])
    assert [s["shard_key"] for s in found] == ["a"] and incomplete == ["b"]
