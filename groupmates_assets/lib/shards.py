"""Pool shards in DCLM format: discovery, partition keys, stable document ids and a streaming reader.

A shard is one file of JSON lines with a ``text`` field (any other fields are kept as they are), plain,
gzip or zstandard compressed (``.jsonl``, ``.json``, ``.jsonl.gz``, ``.json.gz``, ``.jsonl.zst``), or a Parquet
file with a ``text`` column. One shard = one partition.

The reader never raises on a bad record: every malformed line becomes a :class:`Reject` naming the line
and the reason (a line over :data:`MAX_LINE_BYTES` too, unparsed; a UTF-8 byte order mark opening the file is
skipped), so a stage can reconcile ``in = kept + dropped + rejected``. Only a shard that cannot be
read at all (missing, unreadable, not the compression it claims to be, not Parquet) raises
:class:`ShardReadError`, whose message names the file and the cause.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

# Suffix -> format name. Longer suffixes first so `.jsonl.zstd` is not read as `.jsonl`, nor `.json.gz` as `.json`.
# `.json[.gz]` files are JSON lines too (C4 ships `c4-train.00001-of-01024.json.gz`).
SHARD_SUFFIXES: dict[str, str] = {
    ".jsonl.zstd": "jsonl.zst",
    ".jsonl.zst": "jsonl.zst",
    ".jsonl.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")
_KEY_SEPARATOR = "__"  # stands for '/' of nested shard layouts: `global-shard_01__shard_0003`
_SNIPPET_CHARS = 200
_READ_CHUNK = 4 << 20
# A JSON line longer than this is rejected unparsed, and only its head is kept while it streams by: a shard
# that is not line-delimited (a binary file, a JSON array on one line) must not be buffered whole in memory.
# DCLM documents are at most a few MB.
MAX_LINE_BYTES = 64 << 20
_BOM = b"\xef\xbb\xbf"


class ShardReadError(RuntimeError):
    """The shard cannot be read at all; the message names the file and the cause."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"cannot read pool shard {path}: {cause}")
        self.path = path
        self.cause = cause


class InvalidShardKeyError(ValueError):
    """A shard file name that cannot safely become a partition key (and later a storage path)."""


@dataclass(frozen=True)
class ShardFile:
    key: str
    path: str  # as the filesystem sees it (no protocol)
    relative_path: str
    format: str
    size: int


@dataclass(frozen=True)
class Reject:
    line: int  # 1-based line (or row) number in the shard file
    reason: str
    snippet: str


@dataclass
class ShardBatch:
    """A batch of parsed records from one shard; parallel lists keep per-record overhead low."""

    lines: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)  # the other fields of the record, as a JSON object
    groups: list[str | None] = field(default_factory=list)  # value of the reporting field (e.g. source)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def records_in(self) -> int:
        return len(self.lines) + len(self.rejects)


# -- keys and ids ---------------------------------------------------------------------------------------
def shard_format(name: str) -> str | None:
    """The shard format a file name declares, or None when it is not a shard file."""
    for suffix, fmt in SHARD_SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    return None


def validate_shard_key(key: str) -> str:
    """Partition keys become storage paths; accept only a conservative, URL- and path-safe alphabet."""
    if not _KEY_PATTERN.fullmatch(key) or ".." in key:  # fullmatch: '$' alone would let a trailing '\n' in
        raise InvalidShardKeyError(
            f"invalid shard key {key!r}: use letters, digits, '.', '_', '=' and '-' (at most 200 characters, "
            "starting with a letter or digit, no '..')"
        )
    return key


def shard_key_for(relative_path: str) -> str:
    """Key of a shard file from its path relative to the pool root, without the format suffix.

    The format is not part of the key, so the same shard re-encoded (jsonl -> zst -> parquet) keeps its
    key and therefore its document ids.
    """
    fmt_suffix = next((s for s in SHARD_SUFFIXES if relative_path.endswith(s)), None)
    if fmt_suffix is None:
        raise InvalidShardKeyError(f"not a shard file (expected one of {sorted(SHARD_SUFFIXES)}): {relative_path}")
    stem = relative_path[: -len(fmt_suffix)]
    return validate_shard_key(stem.strip("/").replace("/", _KEY_SEPARATOR))


def text_hash(text: str) -> str:
    """The digest a doc_id ends with; a join by doc_id compares it with the text it found."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def make_doc_id(shard_key: str, line: int, text: str) -> str:
    """Stable document id: shard key, 1-based line and a hash of the text (catches misaligned joins)."""
    return f"{shard_key}:{line:08d}:{text_hash(text)}"


def discover_shards(fs: Any, root: str) -> tuple[list[ShardFile], list[str]]:
    """All shard files under ``root`` (recursively), sorted by key, and problems found on the way.

    Every file that is not returned is named in a problem with the reason it was skipped (hidden file, not a
    shard suffix, a name that cannot become a key, two files mapping to one key): nothing is silently ignored.
    Problems are returned, not raised, so a sensor can report them and go on with the healthy shards.
    """
    root = root.rstrip("/")
    found: dict[str, ShardFile] = {}
    clashes: dict[str, list[str]] = {}  # key -> paths of every file that maps to it (all are skipped)
    problems: list[str] = []
    if not fs.exists(root):
        return [], [f"pool directory does not exist: {root}"]
    for path, info in sorted(fs.find(root, detail=True).items()):
        relative = posixpath.relpath(path, root)
        if posixpath.basename(path).startswith("."):  # .DS_Store, a writer's temporary file
            problems.append(f"{path}: skipped: hidden file")
            continue
        fmt = shard_format(posixpath.basename(path))
        if fmt is None:
            problems.append(f"{path}: skipped: not a shard file (expected one of {', '.join(SHARD_SUFFIXES)})")
            continue
        try:
            key = shard_key_for(relative)
        except InvalidShardKeyError as exc:
            problems.append(f"{path}: skipped: {exc}")
            continue
        if key in found or key in clashes:  # any number of files, not only two, may share a key
            first = found.pop(key, None)
            clashes.setdefault(key, [first.path] if first else []).append(path)
            continue
        found[key] = ShardFile(key, path, relative, fmt, int(info.get("size") or 0))
    for key, paths in clashes.items():
        problems.append(f"{paths[-1]}: shard key {key!r} is also used by {', '.join(paths[:-1])}; "
                        f"skipped all {len(paths)} files")
    return sorted(found.values(), key=lambda s: s.key), problems


# -- reading --------------------------------------------------------------------------------------------
class TruncatedStreamError(Exception):
    """A compressed stream that stops before its end marker: the file was cut off."""


def decompressed_chunks(raw: IO[bytes], fmt: str) -> Iterator[bytes]:
    """Decompress chunk by chunk, across concatenated members/frames; TruncatedStreamError at a cut end."""
    if fmt == "jsonl":
        while chunk := raw.read(_READ_CHUNK):
            yield chunk
        return
    new_decoder: Callable[[], Any]
    if fmt == "jsonl.gz":
        new_decoder = lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # noqa: E731
    else:
        dctx = zstandard.ZstdDecompressor()
        new_decoder = dctx.decompressobj
    decoder, in_member = new_decoder(), False
    while compressed := raw.read(_READ_CHUNK):
        while compressed:
            out = decoder.decompress(compressed)
            in_member = True
            if out:
                yield out
            if not decoder.eof:
                break
            compressed = decoder.unused_data
            decoder, in_member = new_decoder(), False
    if in_member and not decoder.eof:
        raise TruncatedStreamError("compressed stream ends before its end marker (truncated file)")


def _json_record(raw: bytes, group_field: str | None) -> tuple[str, str, str | None] | str:
    """Parse one line into (text, other fields as JSON, group value), or return the reject reason."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            return f"invalid UTF-8 at byte {uexc.start}"
        return f"invalid JSON: {exc}"
    if not isinstance(record, dict):
        return f"record is a JSON {type(record).__name__}, not an object"
    if "text" not in record:
        return "missing 'text' field"
    text = record.pop("text")
    if text is None:
        return "'text' is null"
    if not isinstance(text, str):
        return f"'text' is a {type(text).__name__}, not a string"
    if not text or text.isspace():
        return "empty text"
    group = record.get(group_field) if group_field else None
    return text, (orjson.dumps(record).decode() if record else "{}"), (group if isinstance(group, str) else None)


def _snippet(raw: bytes) -> str:
    return raw[: _SNIPPET_CHARS * 4].decode("utf-8", "replace")[:_SNIPPET_CHARS]


def _iter_jsonl(raw: IO[bytes], fmt: str, path: str, batch_size: int, group_field: str | None,
                max_line_bytes: int) -> Iterator[ShardBatch]:
    batch, line_no, produced = ShardBatch(), 0, False
    # The unfinished last line in pieces, joined once it ends (a long line is not re-copied for every chunk).
    # Past max_line_bytes only its head is kept, for the reject's snippet; pending_size still counts it all.
    pending: list[bytes] = []
    pending_size = 0
    try:
        for chunk in decompressed_chunks(raw, fmt):
            produced = True
            lines = chunk.split(b"\n")
            tail = lines.pop()
            if lines and pending_size:
                size = pending_size + len(lines[0])
                if size > max_line_bytes:
                    line_no += 1
                    batch.rejects.append(_overlong(line_no, size, max_line_bytes, _head([*pending, lines[0]])))
                    del lines[0]
                else:
                    lines[0] = b"".join(pending) + lines[0]
                pending, pending_size = [], 0
            for raw_line in lines:
                line_no += 1
                if len(raw_line) > max_line_bytes:
                    batch.rejects.append(_overlong(line_no, len(raw_line), max_line_bytes, raw_line))
                else:
                    _add_json_line(batch, line_no, raw_line, group_field)
                if len(batch.lines) + len(batch.rejects) >= batch_size:
                    yield batch
                    batch = ShardBatch()
            if tail:
                if pending_size + len(tail) <= max_line_bytes:
                    pending.append(tail)
                else:  # past the limit: keep only the line's head, for the reject's snippet
                    pending = [_head([*pending, tail])]
                pending_size += len(tail)
    except TruncatedStreamError as exc:
        line_no += 1
        batch.rejects.append(Reject(line_no, str(exc), _snippet(_head(pending))))
        yield batch
        return
    except (zlib.error, zstandard.ZstdError, OSError) as exc:
        if not produced:
            raise ShardReadError(path, f"not a valid {fmt} file ({exc})") from exc
        line_no += 1
        batch.rejects.append(Reject(line_no, f"corrupt compressed stream: {exc}", _snippet(_head(pending))))
        yield batch
        return
    if pending_size:  # last line without a trailing newline
        line_no += 1
        if pending_size > max_line_bytes:
            batch.rejects.append(_overlong(line_no, pending_size, max_line_bytes, _head(pending)))
        else:
            _add_json_line(batch, line_no, b"".join(pending), group_field)
    yield batch


def _overlong(line_no: int, size: int, limit: int, head: bytes) -> Reject:
    return Reject(line_no, f"line too long: {size} bytes, limit {limit}", _snippet(head))


def _head(pieces: list[bytes]) -> bytes:
    """The first bytes of a line held in pieces (enough for a snippet), without joining all of it."""
    head = b""
    for piece in pieces:
        head += piece[: _SNIPPET_CHARS * 4 - len(head)]
        if len(head) >= _SNIPPET_CHARS * 4:
            break
    return head


def _add_json_line(batch: ShardBatch, line_no: int, raw_line: bytes, group_field: str | None) -> None:
    # Fast path for the common, well-formed record; anything else goes through the diagnosing parser.
    try:
        record = orjson.loads(raw_line)  # JSON whitespace includes a trailing "\r"
    except orjson.JSONDecodeError:
        record = None
    if type(record) is dict:
        text = record.get("text")
        if type(text) is str and text and not text.isspace():
            del record["text"]
            group = record.get(group_field) if group_field else None
            batch.lines.append(line_no)
            batch.texts.append(text)
            batch.fields.append(orjson.dumps(record).decode() if record else "{}")
            batch.groups.append(group if type(group) is str else None)
            return
    if raw_line.endswith(b"\r"):
        raw_line = raw_line[:-1]
    if line_no == 1 and raw_line.startswith(_BOM):  # a UTF-8 byte order mark, as some editors and tools write
        raw_line = raw_line[len(_BOM):]
    if not raw_line or raw_line.isspace():
        batch.rejects.append(Reject(line_no, "blank line", ""))
        return
    parsed = _json_record(raw_line, group_field)
    if isinstance(parsed, str):
        batch.rejects.append(Reject(line_no, parsed, _snippet(raw_line)))
        return
    batch.lines.append(line_no)
    batch.texts.append(parsed[0])
    batch.fields.append(parsed[1])
    batch.groups.append(parsed[2])


def _iter_parquet(raw: IO[bytes], path: str, batch_size: int, group_field: str | None) -> Iterator[ShardBatch]:
    try:
        parquet = pq.ParquetFile(raw)
    except (pa.ArrowException, OSError) as exc:
        raise ShardReadError(path, f"not a valid Parquet file ({exc})") from exc
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise ShardReadError(path, f"Parquet file has no 'text' column (columns: {names})")
    text_type = parquet.schema_arrow.field("text").type
    row = 0
    try:
        for record_batch in parquet.iter_batches(batch_size=batch_size):
            batch = ShardBatch()
            texts = _text_values(record_batch.column(record_batch.schema.get_field_index("text")))
            others = _other_values(record_batch.drop_columns(["text"]))
            for text, other in zip(texts, others, strict=True):
                row += 1
                reason = _parquet_text_problem(text, text_type)
                if isinstance(text, bytes) and reason is None:
                    text = text.decode("utf-8")
                if reason is None and isinstance(other, str):
                    reason = other
                if reason is not None:
                    batch.rejects.append(Reject(row, reason, str(text)[:_SNIPPET_CHARS] if text is not None else ""))
                    continue
                group = other.get(group_field) if group_field else None
                batch.lines.append(row)
                batch.texts.append(text)
                batch.fields.append(orjson.dumps(other, default=str).decode() if other else "{}")
                batch.groups.append(group if isinstance(group, str) else None)
            yield batch
    except (pa.ArrowException, OSError) as exc:
        raise ShardReadError(path, f"Parquet data unreadable after row {row} ({exc})") from exc


def _text_values(column: pa.Array) -> list[Any]:
    """The text column as Python values. Arrow does not validate UTF-8 when it reads Parquet, so a string column
    from a writer that did not check it can hold bytes that fail to decode; that column is read as bytes, and
    each bad row becomes an "invalid UTF-8" reject rather than an error that stops the shard."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()).to_pylist()


def _other_values(others: pa.RecordBatch) -> list[dict[str, Any] | str]:
    """Each row's other columns as a dict, or the reject reason of a row where one holds invalid UTF-8."""
    try:
        return others.to_pylist()
    except UnicodeDecodeError:
        pass
    rows: list[dict[str, Any] | str] = []
    for index in range(others.num_rows):
        values: dict[str, Any] | str = {}
        for name, column in zip(others.schema.names, others.columns, strict=True):
            try:
                values[name] = column[index].as_py()
            except UnicodeDecodeError as exc:
                values = f"invalid UTF-8 in column {name!r} at byte {exc.start}"
                break
        rows.append(values)
    return rows


def _parquet_text_problem(text: Any, text_type: pa.DataType) -> str | None:
    if text is None:
        return "'text' is null"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"invalid UTF-8 at byte {exc.start}"
    if not isinstance(text, str):
        return f"'text' is {text_type}, not a string"
    if not text.strip():
        return "empty text"
    return None


def read_shard(
    fs: Any, shard: ShardFile, batch_size: int = 8192, group_field: str | None = "source",
    max_line_bytes: int | None = None,
) -> Iterator[ShardBatch]:
    """Stream a shard as batches of parsed records and rejects (see module docstring for the contract).

    ``max_line_bytes`` (default :data:`MAX_LINE_BYTES`): longer JSON lines are rejected without being parsed.
    """
    try:
        raw = fs.open(shard.path, "rb")
    except (OSError, ValueError) as exc:
        raise ShardReadError(shard.path, f"{type(exc).__name__}: {exc}") from exc
    with raw:
        if shard.format == "parquet":
            yield from _iter_parquet(raw, shard.path, batch_size, group_field)
        else:
            limit = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
            yield from _iter_jsonl(raw, shard.format, shard.path, batch_size, group_field, limit)
