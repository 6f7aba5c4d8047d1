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
    assert stats["rows_in"] == 73 == stats["kept"] + stats["dropped"] + stats["rejected"]
    assert stats["rejected"] == 3 and stats["kept"] == 35 and stats["dropped"] == 35
    assert stats["by_group"] == {"prose": {"in": 35, "kept": 35}, "spam": {"in": 35, "kept": 0}}
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
    assert sorted(storage.list("out/s-0")) == ["dropped.parquet", "kept.parquet", "rejects.parquet"]


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
