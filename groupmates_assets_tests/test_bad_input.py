"""Bad input (issue 8, item 2): property-based tests over the pool readers, the filter stage and the config.

Every bad record is either a counted rejection naming its line and reason, or the whole shard fails with an
error naming the file; nothing escapes from deep inside a library. Counts always reconcile: records in = lines
parsed + rejects (reader), in = kept + dropped + rejected (filter), and both equal an independent recount of
the source. Out-of-range settings fail when the profile is built, naming the field.

Hypothesis runs derandomized (the same examples on every machine) with small example counts, so the whole
file stays well under a minute on 2 cores.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import re
import string
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import dagster as dg
import fsspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupmates_assets import settings as settings_module
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.pool.assets import embedded_pool, pool_shard
from groupmates_assets.defs.quality.assets import filtered_pool_shard, filtered_pool_summary, quality_classifier
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import clustering, filtering, quality, selection, shards
from groupmates_assets.lib.storage import Storage
from groupmates_assets_tests.conftest import bad_texts, good_texts, jsonl_bytes, records

pytestmark = pytest.mark.unit

FS = fsspec.filesystem("file")
BOM = b"\xef\xbb\xbf"
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst")


def examples(n: int) -> settings:
    """Reproducible (derandomized, no example database) and bounded: ``n`` examples, no per-example deadline."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- one line of a shard, with what the reader must make of it ---------------------------------------------
@dataclass(frozen=True)
class Line:
    raw: bytes  # as written, without its line ending
    text: str | None  # the text the reader returns, or None: the line is rejected ...
    reason: str = ".+"  # ... with a reason matching this regular expression (whole reason)
    fields: dict | None = None  # the record's other fields, for a parsed line


def _is_record(raw: bytes) -> bool:
    """Would a parser accept this line? Used only to keep random garbage from being a valid record by chance."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(value, dict) and isinstance(value.get("text"), str) and bool(value["text"].strip())


SAFE_ASCII = st.text(st.sampled_from(string.ascii_letters + string.digits + " .,"), max_size=20)
ENGLISH = st.text(st.characters(codec="ascii"), min_size=1, max_size=60)
NON_ENGLISH = st.text(
    st.sampled_from(list("日本語の文章、中文汉字。한국어 العربية русский Ελληνικά हिन्दी עברית ไทย")) | st.characters(
        codec="utf-8", min_codepoint=0x80), min_size=1, max_size=60)
BINARY_LOOKING = st.one_of(
    st.text(st.characters(max_codepoint=0x1F) | st.characters(min_codepoint=0x7F, max_codepoint=0x9F)
            | st.sampled_from(["\ufffd", "\ufeff", "\u200b", "\u2028", "\u2029", "\U0010ffff", "\x00"]),
            min_size=1, max_size=60),
    st.binary(min_size=1, max_size=60).map(lambda b: b.decode("latin-1")),  # bytes read as Latin-1
)
TEXTS = st.one_of(ENGLISH, NON_ENGLISH, BINARY_LOOKING)
SMALL_INTS = st.integers(-(2**53), 2**53)
EXTRA_FIELDS = st.dictionaries(st.sampled_from(["source", "url", "meta"]),
                               st.one_of(st.text(max_size=10), SMALL_INTS, st.none()), max_size=3)
NON_STRINGS = st.one_of(SMALL_INTS, st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                        st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                 st.integers(0, 9), max_size=2))


@st.composite
def text_lines(draw, texts=TEXTS) -> Line:
    """A record with a text (good, non-English or binary-looking), other fields in any order and escaping."""
    text, extra = draw(texts), draw(EXTRA_FIELDS)
    record = {**extra, "text": text} if draw(st.booleans()) else {"text": text, **extra}
    raw = json.dumps(record, ensure_ascii=draw(st.booleans())).encode("utf-8")
    if text and not text.isspace():
        return Line(raw, text, fields=extra)
    return Line(raw, None, "empty text")


@st.composite
def invalid_utf8_lines(draw) -> Line:
    head = b'{"text": "' + draw(SAFE_ASCII).encode()
    bad = draw(st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe9", b"\xc0\xaf", b"\xed\xa0\x80",
                                b"\xf4\x90\x80\x80"]))
    return Line(head + bad + draw(SAFE_ASCII).encode() + b'"}', None, f"invalid UTF-8 at byte {len(head)}")


@st.composite
def cut_json_lines(draw) -> Line:
    """A record cut short (a writer killed mid-line): invalid JSON, or invalid UTF-8 when cut inside a character."""
    raw = draw(text_lines()).raw
    return Line(raw[: draw(st.integers(1, len(raw) - 1))], None, r"invalid JSON: .+|invalid UTF-8 at byte \d+")


GARBAGE = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")).filter(
    lambda b: not _is_record(b) and not b.startswith(BOM)).map(lambda b: Line(b, None))
WRONG_TYPES = st.one_of(
    NON_STRINGS.map(lambda v: Line(json.dumps({"text": v}).encode(), None, r"'text' is a \w+, not a string")),
    st.just(Line(b'{"text": null, "url": "u"}', None, "'text' is null")),
    st.one_of(NON_STRINGS.filter(lambda v: not isinstance(v, dict)), st.text(max_size=8), st.none()).map(
        lambda v: Line(json.dumps(v).encode(), None, r"record is a JSON \w+, not an object")),
    st.dictionaries(st.sampled_from(["url", "source", "body"]), st.text(max_size=5), max_size=3).map(
        lambda d: Line(json.dumps(d).encode(), None, "missing 'text' field")),
)
BLANK = st.sampled_from([b"", b" ", b"\t", b"  \t  "]).map(lambda b: Line(b, None, "blank line"))
LONG = st.integers(1, 700).map(lambda n: Line(json.dumps({"text": "x" * n}).encode(), "x" * n, fields={}))
ANY_LINE = st.one_of(text_lines(), text_lines(NON_ENGLISH), text_lines(BINARY_LOOKING), invalid_utf8_lines(),
                     cut_json_lines(), GARBAGE, WRONG_TYPES, BLANK, LONG)


@dataclass(frozen=True)
class Shard:
    data: bytes  # the decompressed file
    expected: list[tuple[str | None, str, dict | None]]  # per record (line 1, 2, ...): text or None, reason, fields
    written: list[bytes]  # per record: the line as written


def _expected(lines: list[Line], written: list[bytes], limit: int) -> list[tuple[str | None, str, dict | None]]:
    out = []
    for line, raw in zip(lines, written, strict=True):
        if len(raw) > limit:  # the limit counts the line as written: a BOM and a trailing '\r' included
            out.append((None, re.escape(f"line too long: {len(raw)} bytes, limit {limit}"), None))
        else:
            out.append((line.text, line.reason, line.fields))
    return out


@st.composite
def jsonl_shards(draw, max_lines: int = 25, limit: int = shards.MAX_LINE_BYTES) -> Shard:
    """A mixture of good and bad lines, some duplicated, CRLF or LF endings, maybe a BOM, maybe no last newline."""
    base = draw(st.lists(ANY_LINE, max_size=max_lines))
    duplicates = draw(st.lists(st.sampled_from(base), max_size=4)) if base else []
    lines = draw(st.permutations(base + duplicates))
    if not lines:
        return Shard(b"", [], [])
    written = [line.raw + (b"\r" if draw(st.booleans()) else b"") for line in lines]
    if draw(st.booleans()):
        written[0] = BOM + written[0]
    final_newline = draw(st.booleans())
    data = b"\n".join(written) + (b"\n" if final_newline else b"")
    if not final_newline and not written[-1]:  # an empty last line without a newline is no line at all
        lines, written = lines[:-1], written[:-1]
    return Shard(data, _expected(lines, written, limit), written)


def _compress(data: bytes, fmt: str, cuts: list[int]) -> bytes:
    """The file as written: compressed as one or more gzip members / zstd frames split at any byte."""
    if fmt == "jsonl":
        return data
    bounds = [0, *sorted(cuts), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    if fmt == "jsonl.gz":
        return b"".join(gzip.compress(p, mtime=0) for p in pieces)
    cctx = zstandard.ZstdCompressor(level=3)
    return b"".join(cctx.compress(p) for p in pieces)


def _write(directory: str, name: str, content: bytes) -> shards.ShardFile:
    path = Path(directory) / name
    path.write_bytes(content)
    key = shards.shard_key_for(name)
    return shards.ShardFile(key, str(path), name, shards.shard_format(name), len(content))


@dataclass
class Read:
    lines: list[int]
    texts: list[str]
    fields: list[str]
    rejects: list[shards.Reject]
    records_in: int


def _read(shard: shards.ShardFile, batch_size: int = 7, max_line_bytes: int | None = None) -> Read:
    out = Read([], [], [], [], 0)
    for batch in shards.read_shard(FS, shard, batch_size=batch_size, max_line_bytes=max_line_bytes):
        assert len(batch.lines) == len(batch.texts) == len(batch.fields) == len(batch.groups)
        out.lines += batch.lines
        out.texts += batch.texts
        out.fields += batch.fields
        out.rejects += batch.rejects
        out.records_in += batch.records_in
    return out


def _assert_matches(read: Read, expected: list[tuple[str | None, str, dict | None]], path: str) -> None:
    """Every record accounted for exactly once, in order, with the text or the reject reason it must have."""
    outcomes = {line: ("text", text, fields) for line, text, fields in zip(read.lines, read.texts, read.fields,
                                                                           strict=True)}
    for reject in read.rejects:
        assert reject.line not in outcomes, f"{path}: line {reject.line} both parsed and rejected"
        outcomes[reject.line] = ("reject", reject.reason, reject.snippet)
        assert isinstance(reject.snippet, str) and len(reject.snippet) <= 200
        reject.snippet.encode("utf-8")  # no lone surrogates: it must fit an Arrow string column
    assert sorted(outcomes) == list(range(1, len(expected) + 1))
    assert read.records_in == len(expected) == len(read.lines) + len(read.rejects)
    assert read.lines == sorted(read.lines)
    for line, (text, reason, fields) in enumerate(expected, start=1):
        kind, value, extra = outcomes[line]
        if text is None:
            assert kind == "reject" and re.fullmatch(reason, value), f"line {line}: {kind} {value!r}, want {reason}"
        else:
            assert kind == "text" and value == text, f"line {line}: {kind} {value!r}, want the text"
            if fields is not None:
                assert json.loads(extra) == fields


# -- the reader ---------------------------------------------------------------------------------------------
@examples(120)
@given(shard=jsonl_shards(), fmt=st.sampled_from(FORMATS), cuts=st.lists(st.integers(0, 4000), max_size=2),
       read_chunk=st.sampled_from([1, 7, 64, 4 << 20]), batch_size=st.integers(1, 9))
def test_jsonl_mixtures_account_for_every_line(shard, fmt, cuts, read_chunk, batch_size):
    """Malformed JSON, wrong types, invalid UTF-8, blank lines, duplicates, non-English and binary-looking text,
    in any mixture, format, member/frame split and read-chunk size: each line is parsed or rejected with its
    line number and reason, and the counts equal an independent recount of the file's lines."""
    cuts = [c for c in cuts if c <= len(shard.data)]
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(shards, "_READ_CHUNK", read_chunk):
        source = _write(tmp, f"mix.{fmt}", _compress(shard.data, fmt, cuts))
        read = _read(source, batch_size=batch_size)
        _assert_matches(read, shard.expected, source.path)
        assert filtering.count_source_records(FS, source) == read.records_in


@examples(60)
@given(data=st.data(), limit=st.integers(24, 400), fmt=st.sampled_from(FORMATS),
       read_chunk=st.sampled_from([1, 5, 33, 4 << 20]))
def test_enormous_lines_are_rejected_unparsed_and_counted(data, limit, fmt, read_chunk):
    """A line over the limit becomes one "line too long" reject (also when it spans many read chunks or is the
    last line without a newline); the lines around it are unaffected and the counts still reconcile."""
    shard = data.draw(jsonl_shards(max_lines=12, limit=limit))
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(shards, "_READ_CHUNK", read_chunk):
        source = _write(tmp, f"long.{fmt}", _compress(shard.data, fmt, []))
        read = _read(source, max_line_bytes=limit)
        _assert_matches(read, shard.expected, source.path)
        assert filtering.count_source_records(FS, source) == read.records_in
        for reject in read.rejects:  # the snippet is the head of the line, however it was split into chunks
            if reject.reason.startswith("line too long"):
                assert reject.snippet == shard.written[reject.line - 1][:800].decode("utf-8", "replace")[:200]


def test_default_line_limit_rejects_a_line_larger_than_memory_should_hold(tmp_path):
    """A real line over MAX_LINE_BYTES (a shard that is not line-delimited) is rejected, not buffered whole."""
    huge = b'{"text": "' + b"a" * shards.MAX_LINE_BYTES + b'"}'
    data = jsonl_bytes(records(2, 0)) + huge + b"\n" + jsonl_bytes(records(1, 0, 50))
    source = _write(str(tmp_path), "huge.jsonl.zst", _compress(data, "jsonl.zst", []))
    read = _read(source, batch_size=8192)
    assert read.lines == [1, 2, 4] and [r.line for r in read.rejects] == [3]
    assert read.rejects[0].reason == f"line too long: {len(huge)} bytes, limit {shards.MAX_LINE_BYTES}"
    assert read.rejects[0].snippet.startswith('{"text": "aaaa')


def _partial(fmt: str, compressed: bytes) -> bytes:
    """What a decoder makes of a cut-off file: the oracle for how many whole lines must survive."""
    if fmt == "jsonl.gz":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(compressed)
    return zstandard.ZstdDecompressor().decompressobj().decompress(compressed)


@examples(80)
@given(shard=jsonl_shards(max_lines=40), fmt=st.sampled_from(["jsonl.gz", "jsonl.zst"]), data=st.data(),
       read_chunk=st.sampled_from([3, 4 << 20]))
def test_truncated_gzip_and_zstd_keep_whole_lines_and_reject_the_cut_tail(shard, fmt, data, read_chunk):
    """A compressed shard cut anywhere: the whole lines before the cut are read as in the full file, the cut-off
    rest is exactly one reject (the line after them, "truncated"), and the recount agrees."""
    full = _compress(shard.data + (b"" if shard.data.endswith(b"\n") or not shard.data else b"\n"), fmt, [])
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(shards, "_READ_CHUNK", read_chunk):
        source = _write(tmp, f"cut.{fmt}", full[:cut])
        read = _read(source)
        whole = _partial(fmt, full[:cut]).count(b"\n") if cut else 0
        expected = shard.expected[:whole]
        if cut:
            expected.append((None, re.escape("compressed stream ends before its end marker (truncated file)"), None))
        _assert_matches(read, expected, source.path)
        assert filtering.count_source_records(FS, source) == read.records_in


@examples(80)
@given(shard=jsonl_shards(max_lines=30), fmt=st.sampled_from(["jsonl.gz", "jsonl.zst", "parquet"]),
       data=st.data())
def test_corrupt_bytes_give_a_named_error_or_counted_records(shard, fmt, data):
    """Bytes flipped anywhere in a compressed or Parquet shard: either the shard fails with ShardReadError naming
    the file, or every record is counted (parsed or rejected, lines 1..n) and the recount agrees; never an
    exception from inside zlib, zstandard or Arrow."""
    if fmt == "parquet":
        table = pa.table({"text": [t or "" for t, _, _ in shard.expected] or ["x"]})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=7)
        content = bytearray(sink.getvalue().to_pybytes())
    else:
        content = bytearray(_compress(shard.data or b"{}\n", fmt, []))
    for _ in range(data.draw(st.integers(1, 3), label="flips")):
        position = data.draw(st.integers(0, len(content) - 1), label="position")
        content[position] ^= data.draw(st.integers(1, 255), label="mask")
    with tempfile.TemporaryDirectory() as tmp:
        source = _write(tmp, f"corrupt.{fmt}", bytes(content))
        try:
            read = _read(source)
        except shards.ShardReadError as exc:
            assert source.path in str(exc)
            return
        assert sorted(read.lines + [r.line for r in read.rejects]) == list(range(1, read.records_in + 1))
        assert filtering.count_source_records(FS, source) == read.records_in


@st.composite
def parquet_shards(draw):
    """Rows whose text is a string (valid or not UTF-8, from a writer that does not check), binary, or an int
    column, with nulls, empty and whitespace texts, and an url column that may hold invalid UTF-8 too."""
    n = draw(st.integers(0, 25))
    kind = draw(st.sampled_from(["string", "large_string", "binary", "int64"]))
    value = st.one_of(st.none(), TEXTS.map(lambda t: t.encode("utf-8")), st.sampled_from([b"", b"  ", b"\t\n"]),
                      invalid_utf8_lines().map(lambda line: line.raw))
    if kind == "int64":
        texts = draw(st.lists(st.one_of(st.none(), SMALL_INTS), min_size=n, max_size=n))
        column = pa.array(texts, pa.int64())
    else:
        texts = draw(st.lists(value, min_size=n, max_size=n))
        binary = pa.large_binary() if kind == "large_string" else pa.binary()
        column = pa.array(texts, binary)
        if kind != "binary":
            column = column.view(pa.large_string() if kind == "large_string" else pa.string())
    urls = draw(st.lists(st.one_of(st.none(), SAFE_ASCII.map(str.encode), st.sampled_from([b"\xff", b"ok\xc3"])),
                         min_size=n, max_size=n))
    table = pa.table({"url": pa.array(urls, pa.binary()).view(pa.string()), "text": column,
                      "n": pa.array(range(n), pa.int64())})
    expected = []
    for i, (text, url) in enumerate(zip(texts, urls, strict=True)):
        if text is None:
            expected.append((None, "'text' is null", None))
        elif kind == "int64":
            expected.append((None, re.escape("'text' is int64, not a string"), None))
        else:
            try:
                decoded = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                expected.append((None, f"invalid UTF-8 at byte {exc.start}", None))
                continue
            if not decoded.strip():
                expected.append((None, "empty text", None))
                continue
            try:
                url_value = None if url is None else url.decode("utf-8")
            except UnicodeDecodeError as exc:
                expected.append((None, f"invalid UTF-8 in column 'url' at byte {exc.start}", None))
                continue
            expected.append((decoded, "", {"url": url_value, "n": i}))
    return table, expected, draw(st.integers(1, 9))


@examples(80)
@given(case=parquet_shards())
def test_parquet_bad_values_are_rejected_per_row(case):
    """Parquet rows with a null, empty, wrong-typed or invalidly encoded text, or invalid UTF-8 in another
    column: each is a reject naming its row and reason (Arrow would raise UnicodeDecodeError from inside its
    conversion), the other rows are read, and the counts equal the file's row count."""
    table, expected, row_group_size = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        source = shards.ShardFile("rows", str(path), "rows.parquet", "parquet", path.stat().st_size)
        read = _read(source, batch_size=4)
        _assert_matches(read, expected, source.path)
        assert filtering.count_source_records(FS, source) == read.records_in == len(expected)


@examples(40)
@given(data=st.data())
def test_cut_parquet_fails_naming_the_file(data):
    """A Parquet file cut short has no footer: one clear ShardReadError naming the file, nothing from Arrow."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": good_texts(30)}), sink, row_group_size=8)
    full = sink.getvalue().to_pybytes()
    cut = data.draw(st.integers(0, len(full) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        source = _write(tmp, "cut.parquet", full[:cut])
        with pytest.raises(shards.ShardReadError) as info:
            _read(source)
        assert source.path in str(info.value) and "not a valid Parquet file" in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_shards_have_no_records_and_no_error(tmp_path, fmt):
    """A 0-byte file and a compressed empty file are empty shards: 0 records, nothing rejected."""
    for name, content in ((f"zero.{fmt}", b""), (f"empty.{fmt}", _compress(b"", fmt, []))):
        source = _write(str(tmp_path), name, content)
        read = _read(source)
        assert (read.records_in, read.rejects) == (0, [])
        assert filtering.count_source_records(FS, source) == 0


def test_empty_parquet_shards(tmp_path):
    """A Parquet file with a text column and no rows is empty; a 0-byte .parquet is not Parquet, named."""
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    read = _read(shards.ShardFile("none", str(tmp_path / "none.parquet"), "none.parquet", "parquet", 0))
    assert (read.records_in, read.rejects) == (0, [])
    zero = _write(str(tmp_path), "zero.parquet", b"")
    with pytest.raises(shards.ShardReadError, match=re.escape(zero.path) + ".*not a valid Parquet file"):
        _read(zero)


def test_byte_order_mark_opening_a_shard_is_skipped(tmp_path):
    """Editors and some exporters start a UTF-8 file with a BOM: the first document is read, not rejected."""
    data = BOM + b'{"text": "first"}\n' + BOM + b'{"text": "second"}\n'
    read = _read(_write(str(tmp_path), "bom.jsonl", data))
    assert read.texts == ["first"] and [(r.line, r.reason.split(":")[0]) for r in read.rejects] == [
        (2, "invalid JSON")]  # only a BOM opening the file is an encoding mark


def test_duplicate_documents_are_all_counted_with_distinct_ids(tmp_path):
    """The same document repeated is kept as separate records (deduplication is not the reader's job), each
    with its own line and doc_id, so nothing is silently merged."""
    row = jsonl_bytes(records(1, 0))
    read = _read(_write(str(tmp_path), "dup.jsonl.gz", _compress(row * 5, "jsonl.gz", [])))
    assert read.lines == [1, 2, 3, 4, 5] and len(set(read.texts)) == 1
    assert len({shards.make_doc_id("dup", line, text) for line, text in zip(read.lines, read.texts, strict=True)}) == 5


def test_discovery_skips_every_file_of_a_shared_key(tmp_path):
    """Three (or more) files mapping to one key: all are skipped and named in one problem (this used to raise
    AttributeError at the third file)."""
    for name in ("a.jsonl", "a.jsonl.gz", "a.parquet", "b.jsonl"):
        (tmp_path / name).write_bytes(b"")
    found, problems = shards.discover_shards(FS, str(tmp_path))
    assert [s.key for s in found] == ["b"]
    assert len(problems) == 1 and "skipped all 3 files" in problems[0]
    assert all(str(tmp_path / name) in problems[0] for name in ("a.jsonl", "a.jsonl.gz", "a.parquet"))


SEGMENT = st.text(st.sampled_from(string.ascii_letters + string.digits + "._-= |*?~é中"), min_size=1,
                  max_size=12).filter(lambda s: s not in (".", ".."))
NAMES = st.tuples(st.lists(SEGMENT, min_size=1, max_size=3),
                  st.sampled_from([*shards.SHARD_SUFFIXES, ".txt", ".json", ""])).map(
    lambda t: "/".join(t[0]) + t[1])


@examples(60)
@given(names=st.lists(NAMES, max_size=8, unique=True))
def test_discovery_reports_bad_names_and_never_raises(names):
    """Any file names: discovery returns shards with safe, unique keys and lists each bad or clashing name as a
    problem naming its path; it never raises, and no shard file is silently ignored."""
    fs = fsspec.filesystem("memory")
    root = f"/bad-input-{uuid.uuid4().hex}"
    try:
        for name in names:
            if any(other.startswith(name + "/") for other in names):
                continue  # a name that is also a folder of another
            fs.pipe(f"{root}/{name}", b"")
        found, problems = shards.discover_shards(fs, root)
        keys = [s.key for s in found]
        assert len(keys) == len(set(keys)) and keys == sorted(keys)
        for shard in found:
            assert shards.validate_shard_key(shard.key) == shard.key and ".." not in shard.key
            assert shards.shard_format(shard.path.rsplit("/", 1)[-1]) == shard.format
        accounted = {s.path for s in found} | {p.split(": ", 1)[0] for p in problems}
        for path in fs.find(root):
            base = path.rsplit("/", 1)[-1]
            if shards.shard_format(base) and not base.startswith("."):
                assert path in accounted or any(path in p for p in problems), path
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


# -- the filter stage ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("model") / "model.bin")
    quality.train_quality_classifier(good_texts(200), bad_texts(200), path, quality.FastTextRecipe(epoch=5))
    return path


@pytest.fixture(scope="module")
def classifier(classifier_file) -> quality.QualityClassifier:
    return quality.QualityClassifier(classifier_file)


@examples(25)
@given(shard=jsonl_shards(max_lines=30), fmt=st.sampled_from(FORMATS))
def test_filter_stage_reconciles_on_any_mixture(classifier, shard, fmt):
    """in = kept + dropped + rejected + held out for every mixture, the rejects file holds each bad line with the
    file, line and reason, and kept + dropped + held out are exactly the parsed lines, with unique doc ids."""
    with tempfile.TemporaryDirectory() as tmp:
        source = _write(tmp, f"f-0.{fmt}", _compress(shard.data, fmt, []))
        storage = Storage(str(Path(tmp) / "store"))
        stats = filtering.filter_shard(source, FS, classifier, 0.5, storage, "out", batch_size=5, heldout_fraction=0.3)
        assert stats["rows_in"] == stats["kept"] + stats["dropped"] + stats["rejected"] + stats["heldout"] == len(
            shard.expected)
        bad = [(i, reason) for i, (text, reason, _) in enumerate(shard.expected, start=1) if text is None]
        rejects = storage.read_parquet("out/rejects.parquet").to_pylist()
        assert [r["line"] for r in rejects] == [i for i, _ in bad]
        assert all(r["file"] == source.path and re.fullmatch(reason, r["reason"])
                   for r, (_, reason) in zip(rejects, bad, strict=True))
        assert sum(stats["reject_reasons"].values()) == stats["rejected"]
        kept = storage.read_parquet("out/kept.parquet")
        dropped = storage.read_parquet("out/dropped.parquet")
        held = storage.read_parquet("out/heldout.parquet")
        lines = sorted(kept.column("line").to_pylist() + dropped.column("line").to_pylist()
                       + held.column("line").to_pylist())
        assert lines == [i for i, (text, _, _) in enumerate(shard.expected, start=1) if text is not None]
        ids = kept.column("doc_id").to_pylist() + dropped.column("doc_id").to_pylist() + held.column(
            "doc_id").to_pylist()
        assert len(set(ids)) == len(ids)
        scores = np.concatenate([kept.column("quality_score").to_numpy(), dropped.column("quality_score").to_numpy()])
        assert np.all((scores >= 0) & (scores <= 1))
        ok, details = filtering.verify_filtered_shard(storage, "out", filtering.count_source_records(FS, source))
        assert ok, details


def test_filter_stage_on_an_empty_shard(classifier, tmp_path):
    storage = Storage(str(tmp_path / "store"))
    for fmt in FORMATS:
        source = _write(str(tmp_path), f"e.{fmt}", b"")
        stats = filtering.filter_shard(source, FS, classifier, 0.5, storage, f"out/{fmt}")
        assert (stats["rows_in"], stats["kept"], stats["dropped"], stats["rejected"], stats["heldout"]) == (0,) * 5
        assert filtering.verify_filtered_shard(storage, f"out/{fmt}", 0)[0]


# -- through Dagster: one shard holding every bad class -----------------------------------------------------
ASSETS = [embedded_pool, pool_shard, quality_classifier, filtered_pool_shard, filtered_pool_summary]


def _every_bad_class() -> list[tuple[bytes, str | None]]:
    """(line, its reject reason's category, or None for a document); built per test: one line is over 64 MiB."""
    return [
        (b'{"text": "unterminated', "invalid JSON"),
        (b'{"text": 12, "source": "x"}', "'text' is a int, not a string"),
        (b"[1, 2, 3]", "record is a JSON list, not an object"),
        (b'{"text": null}', "'text' is null"),
        (b'{"url": "no text"}', "missing 'text' field"),
        (b'{"text": "caf\xe9 au lait"}', "invalid UTF-8"),
        (b"", "blank line"),
        (b'{"text": " \\n\\t "}', "empty text"),
        (b'{"text": "' + b"a" * shards.MAX_LINE_BYTES + b'"}', "line too long"),
        (json.dumps({"text": "日本語の文章は機械学習のデータとして使われる。", "source": "ja"}).encode(), None),
        (json.dumps({"text": "Текст на русском языке о реках и озёрах.", "source": "ru"},
                    ensure_ascii=False).encode(), None),
        (json.dumps({"text": "\x00\x01\x02\ufffd\x7f binary \x1b[0m \u200b", "source": "bin"}).encode(), None),
        (json.dumps({"text": "word " * 200_000, "source": "long"}).encode(), None),  # 1 MB: large, but a document
        (b'{"text": "windows line ending", "source": "crlf"}\r', None),
    ]


def test_filter_asset_counts_every_bad_class_and_writes_the_rejects(classifier_file, tmp_path):
    """A zstd shard with every bad class, duplicates and a cut-off last frame, through the Dagster assets: the
    metadata counts reconcile with the rejects file (file, line, reason), the check passes, and a missing,
    unloadable or deleted quality model fails the step naming the model's path."""
    every_bad_class = _every_bad_class()
    body = BOM + jsonl_bytes(records(20, 20)) + b"\n".join(line for line, _ in every_bad_class) + b"\n"
    dup = jsonl_bytes(records(1, 0, 800))
    body += dup * 3
    tail = jsonl_bytes(records(5, 5, 900))
    cctx = zstandard.ZstdCompressor(level=3)
    cut_frame = cctx.compress(tail)
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "bad-all.jsonl.zst").write_bytes(cctx.compress(body) + cut_frame[: len(cut_frame) // 2])
    lines_in_body = body.count(b"\n")
    first_bad = 41
    expected_rejects = [(first_bad + i, reason) for i, (_, reason) in enumerate(every_bad_class) if reason]
    expected_rejects.append((lines_in_body + 1, "compressed stream ends before its end marker (truncated file)"))

    storage_root = tmp_path / "store"
    platform = PlatformResource(storage_root=str(storage_root), pool_dir=str(pool))
    storage = platform.storage()
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        def run(selection, partition=None, config=None):
            return dg.materialize(ASSETS, selection=selection, partition_key=partition, instance=instance,
                                  resources={"platform": platform}, raise_on_error=False,
                                  run_config={"ops": {"quality_classifier": {"config": config}}} if config else None)

        def failure(result) -> str:
            assert not result.success
            event = next(e for e in result.all_events if e.is_step_failure)
            return event.step_failure_data.user_failure_data.description

        instance.add_dynamic_partitions(pool_shards.name, ["bad-all"])
        assert run(["pool_shard"], "bad-all").success
        missing = failure(run(["quality_classifier"], config={"model_path": "models/absent.bin", "threshold": 0.5}))
        assert "not found" in missing and storage.url("models/absent.bin") in missing
        storage.write_bytes("models/garbage.bin", b"this is not a fastText model")
        garbage = failure(run(["quality_classifier"], config={"model_path": "models/garbage.bin", "threshold": 0.5}))
        assert "cannot be used" in garbage and storage.url("models/garbage.bin") in garbage
        storage.put_file(classifier_file, "models/supplied.bin")
        assert run(["quality_classifier"], config={"model_path": "models/supplied.bin", "threshold": 0.5}).success

        result = run(["filtered_pool_shard"], "bad-all")
        assert result.success
        metadata = result.asset_materializations_for_node("filtered_pool_shard")[0].metadata
        check = result.get_asset_check_evaluations()[0]
        assert check.check_name == "counts_reconcile" and check.passed
        documents = 40 + sum(reason is None for _, reason in every_bad_class) + 3
        assert metadata["rows_in"].value == lines_in_body + 1 == documents + len(expected_rejects)
        assert metadata["kept"].value + metadata["dropped"].value + metadata["heldout"].value == documents
        assert metadata["rejected"].value == len(expected_rejects)
        assert metadata["reject_reasons"].value == {filtering.reason_category(r): 1 for _, r in expected_rejects}
        out = "filtered_pool/bad-all"
        rejects = storage.read_parquet(f"{out}/rejects.parquet").to_pylist()
        assert [(r["line"], filtering.reason_category(r["reason"])) for r in rejects] == expected_rejects
        assert {r["file"] for r in rejects} == {str(pool / "bad-all.jsonl.zst")}
        stats = storage.read_json(f"{out}/stats.json")
        assert stats["rows_in"] == stats["kept"] + stats["dropped"] + stats["rejected"] + stats["heldout"]
        assert {"ja", "ru", "bin", "long", "crlf"} <= set(stats["by_group"])
        kept, dropped = storage.read_parquet(f"{out}/kept.parquet"), storage.read_parquet(f"{out}/dropped.parquet")
        held = storage.read_parquet(f"{out}/heldout.parquet")
        doc_ids = [*kept.column("doc_id").to_pylist(), *dropped.column("doc_id").to_pylist(),
                   *held.column("doc_id").to_pylist()]
        assert len(set(doc_ids)) == documents  # the three duplicates are three documents
        assert 1 in kept.column("line").to_pylist() + dropped.column("line").to_pylist()  # opens with a BOM

        storage.remove(storage.read_json("quality/classifier/current.json")["model"])
        deleted = failure(run(["filtered_pool_shard"], "bad-all"))
        assert "is missing" in deleted and "model.bin" in deleted


# -- config out of range --------------------------------------------------------------------------------------
def _rebuilt(profile: settings_module.Profile) -> settings_module.Profile:
    """The profile built again from its values, so every section's validation runs."""
    sections = {f.name: dataclasses.replace(getattr(profile, f.name)) for f in dataclasses.fields(profile)
                if dataclasses.is_dataclass(getattr(profile, f.name))}
    return dataclasses.replace(profile, **sections)


@pytest.mark.parametrize("name", sorted(settings_module.PROFILES))
def test_every_shipped_profile_validates(name):
    profile = settings_module.PROFILES[name]
    assert _rebuilt(profile) == profile
    assert settings_module.with_thread_cap(profile, 1).lm.torch_threads == 1


@examples(150)
@given(ratio=st.one_of(st.floats(), st.integers(-3, 3)))
def test_selection_ratio_must_be_in_zero_one(ratio):
    """Any float (NaN and infinities too) or integer: accepted iff 0 < ratio <= 1, else a ValueError naming
    selection.ratio and the value."""
    if 0 < ratio <= 1:
        assert settings_module.SelectionProfile(ratio=ratio).ratio == ratio
    else:
        with pytest.raises(ValueError, match=re.escape(f"selection.ratio must be in (0, 1], got {ratio!r}")):
            settings_module.SelectionProfile(ratio=ratio)


def test_ratio_zero_message():
    with pytest.raises(ValueError, match=re.escape("selection.ratio must be in (0, 1], got 0")):
        settings_module.SelectionProfile(ratio=0)
    with pytest.raises(ValueError, match=re.escape("selection.ratio must be in (0, 1], got '0.5'")):
        settings_module.SelectionProfile(ratio="0.5")  # a string from a hand-edited profile


COUNTS = [  # (section class, section name, field, smallest valid value)
    (settings_module.OracleProfile, "oracle", "blocks", 1),
    (settings_module.OracleProfile, "oracle", "trajectories_per_block", 1),
    (settings_module.OracleProfile, "oracle", "bootstrap_blocks", 1),
    (settings_module.OracleProfile, "oracle", "probe_pool_size", 1),
    (settings_module.OracleProfile, "oracle", "reference_size", 1),
    (settings_module.OracleProfile, "oracle", "part_size", 1),
    (settings_module.OracleProfile, "oracle", "workers", 1),
    (settings_module.OracleProfile, "oracle", "replay_per_block", 0),
    (settings_module.InfluenceProfile, "influence", "epochs", 1),
    (settings_module.InfluenceProfile, "influence", "chunk_len", 2),
    (settings_module.InfluenceProfile, "influence", "chunks", 1),
    (settings_module.InfluenceProfile, "influence", "trajectories_per_step", 1),
    (settings_module.InfluenceProfile, "influence", "bootstrap_per_tail", 1),
    (settings_module.InfluenceProfile, "influence", "warmup_steps", 0),
    (settings_module.SelectionProfile, "selection", "mean_cluster_size", 1),
    (settings_module.SelectionProfile, "selection", "kmeans_iterations", 1),
    (settings_module.SelectionProfile, "selection", "cluster_ranges", 1),
    (settings_module.SelectionProfile, "selection", "max_points_per_centroid", 1),
    (settings_module.LMProfile, "lm", "total_steps", 1),
    (settings_module.LMProfile, "lm", "batch_size", 1),
    (settings_module.QualityProfile, "quality", "batch_size", 1),
    (settings_module.TokenizeProfile, "tokenize", "num_local_cells", 1),
    (settings_module.PoolProfile, "pool", "embedded_shards", 1),
    (settings_module.PretrainProfile, "pretrain", "seeds", 1),
    (settings_module.EvalProfile, "evaluation", "heldout_documents", 1),
    (settings_module.EvalProfile, "evaluation", "heldout_min_per_source", 0),
    (settings_module.CausalProfile, "causal", "groups", 1),
    (settings_module.CausalProfile, "causal", "workers", 1),
]


@examples(120)
@given(case=st.sampled_from(COUNTS), value=st.one_of(st.integers(-10**6, 3), st.floats(-5, 5), st.booleans()))
def test_counts_out_of_range_fail_naming_the_field(case, value):
    """Zero trajectories or blocks, negative epochs, chunk_len < 2, zero clusters...: a whole number below the
    minimum, a fraction or a bool fails at construction with the section, field and value named."""
    cls, section, name, minimum = case
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if valid:
        assert getattr(cls(**{name: value}), name) == value
    else:
        with pytest.raises(ValueError, match=re.escape(f"{section}.{name} must be a whole number >= {minimum}, "
                                                       f"got {value!r}")):
            cls(**{name: value})


@pytest.mark.parametrize(("build", "message"), [
    (lambda: settings_module.OracleProfile(trajectories_per_block=0), "oracle.trajectories_per_block"),
    (lambda: settings_module.OracleProfile(blocks=0), "oracle.blocks"),
    (lambda: settings_module.InfluenceProfile(epochs=-1), "influence.epochs must be a whole number >= 1, got -1"),
    (lambda: settings_module.InfluenceProfile(chunk_len=1), "influence.chunk_len must be a whole number >= 2"),
    (lambda: settings_module.InfluenceProfile(val_fraction=1.0), "influence.val_fraction must be in [0, 1)"),
    (lambda: settings_module.InfluenceProfile(dropout=-0.1), "influence.dropout"),
    (lambda: settings_module.InfluenceProfile(lr=0), "influence.lr must be in (0, inf)"),
    (lambda: settings_module.OracleProfile(replay_tolerance=0), "oracle.replay_tolerance must be in (0, inf)"),
    (lambda: settings_module.InfluenceProfile(encoder_layers=0), "influence.encoder_layers"),
    (lambda: settings_module.SelectionProfile(ratio=1.5), "selection.ratio must be in (0, 1], got 1.5"),
    (lambda: settings_module.SelectionProfile(budget_rounding="round"), "selection.budget_rounding"),
    (lambda: settings_module.LMProfile(probe_fraction=1.0), "lm.probe_fraction must be in (0, 1)"),
    (lambda: settings_module.LMProfile(lr=-1e-3), "lm.lr"),
    (lambda: settings_module.QualityProfile(keep_fraction=0), "quality.keep_fraction must be in (0, 1]"),
    (lambda: settings_module.QualityProfile(threshold=1.5), "quality.threshold must be in [0, 1]"),
    (lambda: settings_module.QualityProfile(threshold=None, keep_fraction=None), "a threshold or a keep_fraction"),
    (lambda: settings_module.QualityProfile(model_path=""), "quality.model_path must be a path"),
    (lambda: settings_module.QualityProfile(heldout_fraction=0), "quality.heldout_fraction"),
    (lambda: settings_module.QualityProfile(recipe=quality.FastTextRecipe(epoch=0)), "quality.recipe.epoch"),
    (lambda: settings_module.PoolProfile(embedded_positives_fraction=1), "pool.embedded_positives_fraction"),
    (lambda: settings_module.PoolProfile(heldout_fraction=0.5), "pool.heldout_fraction must be in [0, 0.5)"),
    (lambda: settings_module.PoolProfile(heldout_fraction=-0.1), "pool.heldout_fraction"),
    (lambda: settings_module.CorpusProfile(token_budget=0), "corpus.token_budget"),
    (lambda: settings_module.EvalProfile(tasks=()), "evaluation.tasks"),
    (lambda: settings_module.EvalProfile(limit_per_task=0), "evaluation.limit_per_task"),
    (lambda: settings_module.PretrainProfile(checkpoint_every=0), "pretrain.checkpoint_every"),
    (lambda: settings_module.CausalProfile(methods=()), "causal.methods must name at least one selection method"),
    (lambda: settings_module.Profile(name="x", description="", lm=settings_module.LMProfile(
        total_steps=2, probe_fraction=0.9)), "no steps are left for the selected data"),
    (lambda: settings_module.with_overrides(settings_module.get_profile("demo"), keep_fraction=2.0),
     "quality.keep_fraction"),
    (lambda: settings_module.with_overrides(settings_module.get_profile("demo"), threshold=-0.1),
     "quality.threshold"),
])
def test_invalid_values_fail_naming_the_field(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@examples(40)
@given(n=st.integers(1, 30), k=st.integers(-2, 40), dim=st.integers(1, 4))
def test_more_clusters_than_documents(n, k, dim):
    """k-means with k > documents (or k < 1) is a clear ValueError, raised before faiss is involved; the
    selection stage's k (clusters_for) is clamped to 1 <= k <= documents for any target cluster size."""
    points = np.random.default_rng(n * 100 + dim).standard_normal((n, dim)).astype(np.float32)
    if 1 <= k <= n:
        result = clustering.train_spherical_kmeans(points, k, iterations=2, seed=0)
        assert result.centroids.shape == (k, dim)
    else:
        with pytest.raises(ValueError, match=f"cannot form {k} clusters from {n} documents"):
            clustering.train_spherical_kmeans(points, k, iterations=2, seed=0)
    assert 1 <= selection.clusters_for(n, max(k, 1)) <= n
    with pytest.raises(ValueError, match="no documents to cluster"):
        selection.clusters_for(0, 10)
