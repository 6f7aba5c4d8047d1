"""The held-out slice: set aside before filtering, never in the pool nor the classifier's negatives, sampled
deterministically by source for bits per byte; the user's own held-out shards in any shard format."""

from __future__ import annotations

import random
from collections import Counter

import fsspec
import pytest

from groupmates_assets.lib import filtering, quality, shards
from groupmates_assets.lib import heldout as hl
from groupmates_assets.lib.pool_sample import sample_shards
from groupmates_assets.lib.storage import Storage
from groupmates_assets_tests.conftest import (
    bad_texts,
    good_texts,
    jsonl_bytes,
    records,
    write_parquet,
    write_shard,
)

pytestmark = pytest.mark.unit

FS = fsspec.filesystem("file")
FRACTION = 0.2


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "model.bin")
    quality.train_quality_classifier(good_texts(200), bad_texts(200), path, quality.FastTextRecipe(epoch=10))
    return quality.QualityClassifier(path)


def _shard(tmp_path, rows: list[dict], bad: bytes = b"") -> shards.ShardFile:
    path = write_shard(tmp_path / "pool" / "s-0.jsonl.zst", jsonl_bytes(rows) + bad)
    return shards.ShardFile("s-0", str(path), "s-0.jsonl.zst", "jsonl.zst", path.stat().st_size)


def test_predicate_is_a_pure_function_of_the_text_taking_the_fraction() -> None:
    texts = [f"document number {i} about rivers" for i in range(20_000)]
    held = [t for t in texts if hl.is_heldout(t, 0.05)]
    assert 0.045 < len(held) / len(texts) < 0.055
    assert held == [t for t in reversed(texts) if hl.is_heldout(t, 0.05)][::-1]  # order plays no part
    assert set(held) <= {t for t in texts if hl.is_heldout(t, 0.1)}  # a larger fraction only adds documents
    assert not any(hl.is_heldout(t, 0.0) for t in texts)


def test_filter_sets_the_slice_aside_and_counts_reconcile(tmp_path, classifier) -> None:
    """rows_in = kept + dropped + rejected + heldout; held-out ids are disjoint from kept and dropped; both sources
    contribute; verify_filtered_shard fails when heldout.parquet and stats.json disagree."""
    storage = Storage(str(tmp_path / "store"))
    rows = records(100, 100)
    shard = _shard(tmp_path, rows, b'{"text": 5}\nnot json\n')
    stats = filtering.filter_shard(shard, FS, classifier, 0.5, storage, "out/s-0", heldout_fraction=FRACTION)
    assert stats["rows_in"] == 202 == stats["kept"] + stats["dropped"] + stats["rejected"] + stats["heldout"]
    expected = {shards.make_doc_id("s-0", i, r["text"]) for i, r in enumerate(rows, 1)
                if hl.is_heldout(r["text"], FRACTION)}
    held = storage.read_parquet("out/s-0/heldout.parquet")
    assert set(held.column("doc_id").to_pylist()) == expected and stats["heldout"] == len(expected) > 0
    scored = set(storage.read_parquet("out/s-0/kept.parquet").column("doc_id").to_pylist()) | set(
        storage.read_parquet("out/s-0/dropped.parquet").column("doc_id").to_pylist())
    assert not scored & expected and len(scored) == 200 - len(expected)
    assert sum(stats["score_histogram"]["counts"]) == len(scored)  # held-out documents are never scored
    by_source = Counter(held.column("source").to_pylist())
    assert set(by_source) == {"prose", "spam"}
    assert {g: c["heldout"] for g, c in stats["by_group"].items()} == dict(by_source)
    assert all(c["in"] + c["heldout"] == 100 for c in stats["by_group"].values())
    ok, details = filtering.verify_filtered_shard(storage, "out/s-0", filtering.count_source_records(FS, shard))
    assert ok and details["heldout_rows"] == len(expected)
    summary = filtering.summarize_pool([{**stats, "classifier_version": "v"}])
    assert summary.reconciles and summary.totals["heldout"] == len(expected)
    assert summary.by_group["prose"]["heldout"] == by_source["prose"]
    storage.write_json("out/s-0/stats.json", {**stats, "heldout": stats["heldout"] - 1,
                                              "rows_in": stats["rows_in"] - 1})
    assert not filtering.verify_filtered_shard(storage, "out/s-0")[0]


def test_classifier_negatives_never_come_from_the_slice(tmp_path) -> None:
    rows = records(200, 200)
    shard = _shard(tmp_path, rows)
    sample = sample_shards(FS, [shard], 10_000, 7, exclude=lambda text: hl.is_heldout(text, FRACTION))
    held = {r["text"] for r in rows if hl.is_heldout(r["text"], FRACTION)}
    assert held and not {d.text for d in sample} & held
    assert len(sample) == len(rows) - len(held)  # everything else can still be drawn


def test_allocation_is_proportional_with_a_minimum_per_source() -> None:
    alloc = hl.allocate({"big": 800, "mid": 150, "small": 40, "tiny": 2}, 100, minimum=3)
    assert sum(alloc.values()) == 100 and alloc["tiny"] == 2 and alloc["small"] >= 3
    assert alloc["big"] > alloc["mid"] > alloc["small"]
    assert abs(alloc["big"] / alloc["mid"] - 800 / 150) < 1.0
    assert hl.allocate({"a": 5, "b": 7}, 100) == {"a": 5, "b": 7}  # fewer than asked: all of them


def test_stratified_sample_is_deterministic_and_order_independent() -> None:
    docs = [hl.HeldoutDoc(f"s:{i:08d}:x", source, f"text {i}")
            for i, source in enumerate(["wiki"] * 300 + ["code"] * 100 + ["chat"] * 5)]
    sample = hl.stratified_sample(docs, 40, seed=3)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert sample == hl.stratified_sample(shuffled, 40, seed=3)
    assert sample != hl.stratified_sample(docs, 40, seed=4)
    counts = Counter(d.source for d in sample)
    assert len(sample) == 40 and counts["chat"] == 3 and counts["wiki"] > 2 * counts["code"] >= 8
    assert len({d.doc_id for d in sample}) == 40
    assert hl.sample_fingerprint(sample) != hl.sample_fingerprint(hl.stratified_sample(docs, 40, seed=4))


def test_pool_heldout_reads_completely_filtered_shards_only(tmp_path, classifier) -> None:
    storage = Storage(str(tmp_path / "store"))
    shard = _shard(tmp_path, records(50, 50))
    filtering.filter_shard(shard, FS, classifier, 0.5, storage, "filtered_pool/s-0", heldout_fraction=FRACTION)
    docs = hl.pool_heldout(storage, ["s-0", "missing"])
    assert docs and all(hl.is_heldout(d.text, FRACTION) and d.doc_id.startswith("s-0:") for d in docs)
    storage.remove("filtered_pool/s-0/stats.json")  # an interrupted rerun
    assert hl.pool_heldout(storage, ["s-0"]) == []


def test_user_heldout_shards_in_jsonl_gz_and_parquet(tmp_path) -> None:
    storage = Storage(str(tmp_path / "store"))
    folder = tmp_path / "store" / "mine"
    write_shard(folder / "news.jsonl.gz", jsonl_bytes([{"text": f"news story {i}"} for i in range(4)]))
    write_parquet(folder / "mixed.parquet", [{"text": f"forum post {i}", "source": "forum"} for i in range(3)])
    docs = hl.user_heldout(storage, "mine")
    assert Counter(d.source for d in docs) == {"news": 4, "forum": 3}  # the field, else the file name
    assert {d.doc_id for d in docs} == {shards.make_doc_id(k, i, t) for k, n, t0 in
                                        (("news", 4, "news story"), ("mixed", 3, "forum post"))
                                        for i, t in ((j + 1, f"{t0} {j}") for j in range(n))}
    single = hl.user_heldout(storage, str(folder / "news.jsonl.gz"))  # a file, by absolute path
    assert [d.text for d in single] == [f"news story {i}" for i in range(4)]
    assert len(hl.user_heldout(storage, (folder / "mixed.parquet").as_uri())) == 3  # an fsspec URL


def test_user_heldout_bad_line_names_file_and_line(tmp_path) -> None:
    storage = Storage(str(tmp_path / "store"))
    write_shard(tmp_path / "store" / "bad.jsonl.gz", b'{"text": "fine"}\n{"url": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz, line 2: .*text"):
        hl.user_heldout(storage, "bad.jsonl.gz")
    with pytest.raises(ValueError, match="does not exist"):
        hl.user_heldout(storage, "nowhere.jsonl")
