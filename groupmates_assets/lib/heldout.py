"""The held-out slice of the pool and the held-out set bits per byte is scored on.

A document is held out when a salted hash of its text falls below ``fraction``: a pure function of the text, so
the slice is the same whatever the shard order, partitioning or format, takes the same share of every source, and
an exact duplicate in another shard is held out too (it cannot leak into training). The filter step writes the
slice to ``heldout.parquet`` instead of scoring it, so it enters neither the filtered pool nor any selection, and
the quality classifier's pool negatives skip it as well.

Evaluation draws a fixed-seed sample stratified by source from the current pool's slice, or reads the user's own
held-out shards (``evaluation.heldout_path``) with the pool's shard readers.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from groupmates_assets.lib import layout
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib.storage import Storage

HELDOUT_FILE = "heldout.parquet"
HELDOUT_SCHEMA = pa.schema([("doc_id", pa.string()), ("line", pa.int64()), ("text", pa.large_string()),
                            ("source", pa.string())])
_SALT = b"groupmates-heldout-v1:"
NO_SOURCE = "(none)"


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out slice: its salted text hash, as a number in [0, 1), < fraction."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(_SALT + text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


@dataclass(frozen=True)
class HeldoutDoc:
    doc_id: str
    source: str
    text: str


def pool_heldout(storage: Storage, shard_keys: list[str]) -> list[HeldoutDoc]:
    """The held-out slice of the given filtered shards (those completely filtered, i.e. with stats.json)."""
    docs: list[HeldoutDoc] = []
    for key in shard_keys:
        out = layout.FILTERED_DIR.format(key=key)
        if not storage.exists(f"{out}/stats.json") or not storage.exists(f"{out}/{HELDOUT_FILE}"):
            continue
        table = storage.read_parquet(f"{out}/{HELDOUT_FILE}")
        docs.extend(HeldoutDoc(d, s, t) for d, s, t in zip(
            table.column("doc_id").to_pylist(), table.column("source").to_pylist(), table.column("text").to_pylist(),
            strict=True))
    return docs


def user_heldout(storage: Storage, path: str, group_field: str | None = "source",
                 fs_options: Callable[[str], dict] | None = None) -> list[HeldoutDoc]:
    """Every record of the user's held-out shards (a file or a folder; relative paths are inside the storage root,
    or an fsspec URL opened with ``fs_options(url)``, e.g. the platform's S3 endpoint), with the record's
    ``group_field`` as its source, else the file's name. A malformed record raises ValueError naming the file and
    line."""
    if "://" not in path and not os.path.isabs(path):
        path = storage.url(path)
    fs, root = fsspec.core.url_to_fs(path, **(fs_options(path) if fs_options else {}))
    if not fs.exists(root):
        raise ValueError(f"evaluation.heldout_path {path} does not exist")
    if fs.isdir(root):
        files, problems = shard_io.discover_shards(fs, root)
        if not files:
            raise ValueError(f"evaluation.heldout_path {path} holds no shard files ({'; '.join(problems[:3])})")
    else:
        name = os.path.basename(root)
        fmt = shard_io.shard_format(name)
        if fmt is None:
            raise ValueError(f"evaluation.heldout_path {path}: not a shard file (expected one of "
                             f"{', '.join(shard_io.SHARD_SUFFIXES)})")
        files = [shard_io.ShardFile(shard_io.shard_key_for(name), root, name, fmt, int(fs.size(root)))]
    return [doc for shard in files for doc in _read_user_shard(fs, shard, group_field)]


def _read_user_shard(fs: Any, shard: shard_io.ShardFile, group_field: str | None) -> list[HeldoutDoc]:
    docs = []
    for batch in shard_io.read_shard(fs, shard, group_field=group_field):
        if batch.rejects:
            bad = batch.rejects[0]
            raise ValueError(f"held-out file {shard.path}, line {bad.line}: {bad.reason}")
        fallback = shard.relative_path.rsplit("/", 1)[-1].split(".", 1)[0]
        docs.extend(HeldoutDoc(shard_io.make_doc_id(shard.key, line, text), group or fallback, text)
                    for line, text, group in zip(batch.lines, batch.texts, batch.groups, strict=True))
    return docs


def allocate(counts: dict[str, int], total: int, minimum: int = 3) -> dict[str, int]:
    """Documents drawn per source: at least ``minimum`` (or all it has) from every source, the rest in proportion
    to each source's count (largest remainders), never more than a source has nor more than ``total`` overall
    unless the minimums alone exceed it."""
    sources = sorted(counts)
    if sum(counts.values()) <= total:
        return dict(counts)
    alloc = {s: min(counts[s], minimum) for s in sources}
    left = total - sum(alloc.values())
    while left > 0:
        room = {s: counts[s] - alloc[s] for s in sources if counts[s] > alloc[s]}
        if not room:
            break
        weight = sum(counts[s] for s in room)
        share = {s: left * counts[s] / weight for s in room}
        extra = {s: min(room[s], int(share[s])) for s in room}
        if not any(extra.values()):  # hand out the remainder one by one, largest fractional share first
            for s in sorted(room, key=lambda s: (-(share[s] - int(share[s])), s))[:left]:
                extra[s] = 1
        for s, n in extra.items():
            alloc[s] += n
        left -= sum(extra.values())
    return alloc


def stratified_sample(docs: list[HeldoutDoc], total: int, seed: int, minimum: int = 3) -> list[HeldoutDoc]:
    """A fixed-seed sample of ``total`` documents, stratified by source (see :func:`allocate`), independent of the
    input's order: documents are ordered by doc_id first, and the result is ordered by (source, doc_id)."""
    by_source: dict[str, list[HeldoutDoc]] = defaultdict(list)
    for doc in sorted(docs, key=lambda d: d.doc_id):
        by_source[doc.source].append(doc)
    alloc = allocate({s: len(d) for s, d in by_source.items()}, total, minimum)
    rng = np.random.default_rng(seed)
    chosen: list[HeldoutDoc] = []
    for source in sorted(by_source):
        pool = by_source[source]
        picks = sorted(rng.choice(len(pool), size=alloc[source], replace=False).tolist())
        chosen.extend(pool[i] for i in picks)
    return chosen


def sample_fingerprint(docs: list[HeldoutDoc]) -> str:
    """Hash of the sampled doc ids (which end with a hash of the text): changes whenever the held-out set does."""
    return hashlib.sha256("\n".join(d.doc_id for d in docs).encode()).hexdigest()[:16]
