"""Shard readers: every format, every kind of bad line, keys, and doc_id stability."""

from __future__ import annotations

import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from groupmates_assets.lib import shards
from groupmates_assets_tests.conftest import jsonl_bytes, records, write_parquet, write_shard

pytestmark = pytest.mark.unit

FS = fsspec.filesystem("file")
BAD_LINES = [
    (b'{"text": 12, "url": "x"}', "'text' is a int, not a string"),
    (b"{not json", "invalid JSON"),
    (b'{"url": "no text"}', "missing 'text' field"),
    (b'{"text": null}', "'text' is null"),
    (b'{"text": "   \\n  "}', "empty text"),
    (b'{"text": "caf\xe9 au lait"}', "invalid UTF-8 at byte"),
    (b"", "blank line"),
    (b"[1, 2, 3]", "record is a JSON list, not an object"),
]


def _read(path, key="s") -> tuple[list, list, list]:
    shard = shards.ShardFile(key, str(path), path.name, shards.shard_format(path.name), path.stat().st_size)
    lines, texts, rejects = [], [], []
    for batch in shards.read_shard(FS, shard, batch_size=7):
        lines += batch.lines
        texts += batch.texts
        rejects += batch.rejects
    return lines, texts, rejects


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd"])
def test_every_bad_line_kind_is_rejected_with_line_and_reason(tmp_path, suffix):
    good = jsonl_bytes(records(5, 5))
    data = good + b"\n".join(line for line, _ in BAD_LINES) + b"\n" + jsonl_bytes(records(1, 0, 99))
    lines, texts, rejects = _read(write_shard(tmp_path / f"s{suffix}", data))
    assert lines == [*range(1, 11), 11 + len(BAD_LINES)]
    assert [r.line for r in rejects] == list(range(11, 11 + len(BAD_LINES)))
    for reject, (_, reason) in zip(rejects, BAD_LINES, strict=True):
        assert reason in reject.reason
    assert len(texts) + len(rejects) == data.count(b"\n")


def test_other_fields_are_kept_as_they_are(tmp_path):
    row = {"text": "hello", "url": "u", "meta": {"lang": "en", "score": 0.5}, "tags": [1, 2]}
    path = write_shard(tmp_path / "a.jsonl", json.dumps(row).encode() + b"\n")
    shard = shards.ShardFile("a", str(path), "a.jsonl", "jsonl", 0)
    batch = next(shards.read_shard(FS, shard))
    assert json.loads(batch.fields[0]) == {k: v for k, v in row.items() if k != "text"}


def test_last_line_without_newline_and_crlf(tmp_path):
    path = write_shard(tmp_path / "a.jsonl", b'{"text": "one"}\r\n{"text": "two"}')
    lines, texts, rejects = _read(path)
    assert (lines, texts, rejects) == ([1, 2], ["one", "two"], [])


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_file_keeps_complete_lines_and_rejects_the_tail(tmp_path, suffix):
    data = jsonl_bytes(records(3000, 3000))  # several compressed blocks, so half the file decodes to lines
    full = write_shard(tmp_path / f"full{suffix}", data).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full[: len(full) // 2])
    lines, _, rejects = _read(cut)
    assert 0 < len(lines) < 6000
    assert lines == list(range(1, len(lines) + 1))
    assert len(rejects) == 1 and "truncated" in rejects[0].reason and rejects[0].line == len(lines) + 1


def test_concatenated_gzip_members_and_zstd_frames_are_read_whole(tmp_path):
    a, b = jsonl_bytes(records(3, 0)), jsonl_bytes(records(0, 4))
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(a) + gzip.compress(b))
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(cctx.compress(a) + cctx.compress(b))
    for name in ("m.jsonl.gz", "m.jsonl.zst"):
        lines, _, rejects = _read(tmp_path / name)
        assert lines == list(range(1, 8)) and not rejects


@pytest.mark.parametrize(
    ("name", "content", "cause"),
    [("bad.jsonl.gz", b"this is not gzip at all", "not a valid jsonl.gz"),
     ("bad.jsonl.zst", b"this is not zstd at all", "not a valid jsonl.zst"),
     ("bad.parquet", b"PAR1 but not really", "not a valid Parquet")],
)
def test_unreadable_shard_fails_naming_file_and_cause(tmp_path, name, content, cause):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(shards.ShardReadError) as info:
        _read(path)
    assert str(path) in str(info.value) and cause in str(info.value)


def test_missing_shard_file_fails_naming_it(tmp_path):
    shard = shards.ShardFile("gone", str(tmp_path / "gone.jsonl"), "gone.jsonl", "jsonl", 0)
    with pytest.raises(shards.ShardReadError, match=r"gone\.jsonl"):
        list(shards.read_shard(FS, shard))


def test_parquet_rows_null_wrong_type_and_invalid_utf8(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"text": "fine", "n": 1}, {"text": None, "n": 2},
                                                  {"text": "  ", "n": 3}])
    lines, texts, rejects = _read(path)
    assert (lines, texts) == ([1], ["fine"])
    assert [(r.line, r.reason) for r in rejects] == [(2, "'text' is null"), (3, "empty text")]
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), tmp_path / "b.parquet")
    lines, texts, rejects = _read(tmp_path / "b.parquet")
    assert texts == ["ok"] and rejects[0].line == 2 and "invalid UTF-8" in rejects[0].reason
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    _, texts, rejects = _read(tmp_path / "i.parquet")
    assert texts == [] and len(rejects) == 2 and "not a string" in rejects[0].reason
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "n.parquet")
    with pytest.raises(shards.ShardReadError, match="no 'text' column"):
        _read(tmp_path / "n.parquet")


def test_doc_ids_are_stable_across_runs_and_formats(tmp_path):
    rows = records(20, 20)
    ids = {}
    for name in ("x/s1.jsonl", "y/s1.jsonl.gz", "z/s1.jsonl.zst", "w/s1.parquet"):
        path = write_parquet(tmp_path / name, rows) if name.endswith("parquet") else write_shard(
            tmp_path / name, jsonl_bytes(rows))
        lines, texts, _ = _read(path, key="s1")
        ids[name] = [shards.make_doc_id("s1", line, text) for line, text in zip(lines, texts, strict=True)]
    first = next(iter(ids.values()))
    assert all(v == first for v in ids.values()) and len(set(first)) == 40
    assert shards.make_doc_id("s1", 3, "abc") == shards.make_doc_id("s1", 3, "abc")
    assert shards.make_doc_id("s1", 3, "abc") != shards.make_doc_id("s1", 3, "abd")
    assert shards.make_doc_id("s1", 3, "abc") != shards.make_doc_id("s2", 3, "abc")


def test_shard_keys_from_paths_and_validation():
    assert shards.shard_key_for("global-shard_01/local-0/shard_000.jsonl.zstd") == "global-shard_01__local-0__shard_000"
    assert shards.shard_key_for("a.parquet") == shards.shard_key_for("a.jsonl.gz") == "a"
    for bad in ["../etc/passwd.jsonl", "sp ace.jsonl", ".hidden.jsonl", "a|b.jsonl", "x/..y.jsonl"]:
        with pytest.raises(shards.InvalidShardKeyError):
            shards.shard_key_for(bad)
    with pytest.raises(shards.InvalidShardKeyError):
        shards.shard_key_for("notes.txt")


def test_discover_reports_conflicts_and_bad_names(tmp_path):
    for name in ("a.jsonl", "a.jsonl.gz", "b.parquet", "c d.jsonl", "readme.txt", "sub/e.jsonl.zst"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found, problems = shards.discover_shards(FS, str(tmp_path))
    assert [s.key for s in found] == ["b", "sub__e"]
    assert len(problems) == 3 and any("also used by" in p for p in problems)
    assert f"{tmp_path / 'readme.txt'}: skipped: not a shard file" in "\n".join(problems)
    missing = str(tmp_path / "nope")
    assert shards.discover_shards(FS, missing) == ([], [f"pool directory does not exist: {missing}"])


def test_c4_json_gz_and_json_shards_are_discovered_and_read(tmp_path):
    """C4 ships JSON lines as `c4-train.00001-of-01024.json.gz`: a shard whose key drops the whole suffix."""
    rows = records(4, 3)
    write_shard(tmp_path / "c4" / "c4-train.00001-of-01024.json.gz", jsonl_bytes(rows))
    write_shard(tmp_path / "plain.json", jsonl_bytes(rows[:2]))
    found, problems = shards.discover_shards(FS, str(tmp_path))
    assert problems == []
    assert [(s.key, s.format) for s in found] == [("c4__c4-train.00001-of-01024", "jsonl.gz"), ("plain", "jsonl")]
    texts = [[t for batch in shards.read_shard(FS, shard) for t in batch.texts] for shard in found]
    assert texts == [[r["text"] for r in rows], [r["text"] for r in rows[:2]]]


def test_json_gz_and_jsonl_gz_of_one_name_clash(tmp_path):
    for name in ("x.json.gz", "x.jsonl.gz", "y.json"):
        (tmp_path / name).write_bytes(b"")
    found, problems = shards.discover_shards(FS, str(tmp_path))
    assert [s.key for s in found] == ["y"]
    assert len(problems) == 1 and "shard key 'x' is also used by" in problems[0]
    assert str(tmp_path / "x.json.gz") in problems[0] and str(tmp_path / "x.jsonl.gz") in problems[0]


def test_discovery_names_every_skipped_file_and_why(tmp_path):
    for name in ("notes.txt", ".DS_Store", "sub/.part-0.jsonl.tmp-123", "bad name.jsonl", "ok.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found, problems = shards.discover_shards(FS, str(tmp_path))
    assert [s.key for s in found] == ["ok"]
    assert sorted(problems) == sorted([
        f"{tmp_path / 'notes.txt'}: skipped: not a shard file (expected one of {', '.join(shards.SHARD_SUFFIXES)})",
        f"{tmp_path / '.DS_Store'}: skipped: hidden file",
        f"{tmp_path / 'sub' / '.part-0.jsonl.tmp-123'}: skipped: hidden file",
        next(p for p in problems if p.startswith(f"{tmp_path / 'bad name.jsonl'}: skipped: invalid shard key")),
    ])
