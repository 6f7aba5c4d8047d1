"""Quality-filter one pool shard: score, keep or drop, reject malformed records, and account for every row.

Outputs (under one directory per shard, written atomically):
  ``kept.parquet``     doc_id, line, text, quality_score, fields (the record's other fields as JSON)
  ``dropped.parquet``  doc_id, line, quality_score: what the threshold removed, for inspection
  ``rejects.parquet``  file, line, reason, snippet: malformed input
  ``heldout.parquet``  doc_id, line, text, source: the held-out slice (lib.heldout), never scored nor kept
  ``stats.json``       counts, score histogram, per-source keep rates, hashes; written last, it is the
                       completion marker (removed first on a rerun, so a killed rerun reads as incomplete).
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from groupmates_assets.lib import failpoints, layout
from groupmates_assets.lib import heldout as heldout_lib
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib.quality import QualityClassifier, normalize_for_fasttext
from groupmates_assets.lib.storage import Storage

FILTER_VERSION = "filter-v2"  # v2: the held-out slice is set aside before scoring
HISTOGRAM_BINS = 20
KEPT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("line", pa.int64()), ("text", pa.large_string()),
     ("quality_score", pa.float32()), ("fields", pa.string())]
)
DROPPED_SCHEMA = pa.schema([("doc_id", pa.string()), ("line", pa.int64()), ("quality_score", pa.float32())])
REJECTS_SCHEMA = pa.schema(
    [("file", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("snippet", pa.string())]
)
OUTPUT_FILES = {"kept": "kept.parquet", "dropped": "dropped.parquet", "rejects": "rejects.parquet",
                "heldout": heldout_lib.HELDOUT_FILE}
COUNTS = ("rows_in", "kept", "dropped", "rejected", "heldout")
STATS_FILE = "stats.json"


def reason_category(reason: str) -> str:
    """Group reject reasons for reporting ("invalid JSON: ..." -> "invalid JSON")."""
    return reason.split(":", 1)[0].split(" at byte", 1)[0]


@dataclass
class _Tally:
    rows_in: int = 0
    kept: int = 0
    dropped: int = 0
    rejected: int = 0
    heldout: int = 0
    chars_scored: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def filter_shard(
    shard: shard_io.ShardFile,
    pool_fs: Any,
    classifier: QualityClassifier,
    threshold: float,
    storage: Storage,
    out_dir: str,
    *,
    batch_size: int = 8192,
    group_field: str | None = "source",
    progress: Callable[[dict[str, Any]], None] | None = None,
    progress_every_s: float = 10.0,
    extra_stats: dict[str, Any] | None = None,
    heldout_fraction: float = 0.0,
) -> dict[str, Any]:
    """Filter one shard into ``out_dir`` and return its stats (also written as ``stats.json``); documents in the
    held-out slice (``heldout_fraction``, see lib.heldout) go to ``heldout.parquet`` before scoring."""
    storage.remove(f"{out_dir}/{STATS_FILE}")
    tally, reasons = _Tally(), Counter()
    histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    by_group: dict[str, list[int]] = {}
    started = last_report = time.perf_counter()
    with contextlib.ExitStack() as stack:
        sinks = {name: stack.enter_context(storage.open_write(f"{out_dir}/{file}"))
                 for name, file in OUTPUT_FILES.items()}
        # Dictionary encoding only pays for repetitive columns; ids and texts are unique.
        writers = {
            "kept": stack.enter_context(pq.ParquetWriter(
                sinks["kept"], KEPT_SCHEMA, compression="zstd", use_dictionary=["fields"])),
            "dropped": stack.enter_context(pq.ParquetWriter(
                sinks["dropped"], DROPPED_SCHEMA, compression="zstd", use_dictionary=False)),
            "rejects": stack.enter_context(pq.ParquetWriter(sinks["rejects"], REJECTS_SCHEMA, compression="zstd")),
            "heldout": stack.enter_context(pq.ParquetWriter(
                sinks["heldout"], heldout_lib.HELDOUT_SCHEMA, compression="zstd", use_dictionary=["source"])),
        }
        for batch in shard_io.read_shard(pool_fs, shard, batch_size=batch_size, group_field=group_field):
            tally.rows_in += batch.records_in
            batch = _set_aside_heldout(batch, shard.key, heldout_fraction, writers["heldout"], tally, by_group)
            _write_batch(batch, shard, classifier, threshold, writers, tally, reasons, histogram, by_group)
            failpoints.hit("filter.batch")
            now = time.perf_counter()
            if progress and now - last_report >= progress_every_s:
                last_report = now
                progress({**tally.as_dict(), "seconds": round(now - started, 1)})
    seconds = time.perf_counter() - started
    files = {name: sinks[name].info.as_metadata() for name in OUTPUT_FILES}
    stats = {
        "filter_version": FILTER_VERSION,
        "shard_key": shard.key,
        "source_path": shard.path,
        "source_format": shard.format,
        "source_bytes": shard.size,
        **tally.as_dict(),
        "threshold": threshold,
        "heldout_fraction": heldout_fraction,
        "reject_reasons": dict(sorted(reasons.items())),
        "score_histogram": {"bin_edges": np.linspace(0, 1, HISTOGRAM_BINS + 1).round(4).tolist(),
                            "counts": histogram.tolist()},
        "by_group": {g: {"in": c[0], "kept": c[1], "heldout": c[2]} for g, c in sorted(by_group.items())},
        "group_field": group_field,
        "seconds": round(seconds, 3),
        "docs_per_second": round(tally.rows_in / seconds, 1) if seconds > 0 else None,
        "mb_per_second": round(shard.size / 1e6 / seconds, 2) if seconds > 0 else None,
        "files": files,
        **(extra_stats or {}),
    }
    storage.write_json(f"{out_dir}/{STATS_FILE}", stats)
    return stats


def _set_aside_heldout(batch: shard_io.ShardBatch, key: str, fraction: float, writer: pq.ParquetWriter,
                       tally: _Tally, by_group: dict[str, list[int]]) -> shard_io.ShardBatch:
    """Write the batch's held-out documents and return the batch without them (rejects and rows_in unchanged)."""
    held = [i for i, text in enumerate(batch.texts) if heldout_lib.is_heldout(text, fraction)]
    if not held:
        return batch
    groups = [batch.groups[i] if batch.groups[i] is not None else heldout_lib.NO_SOURCE for i in held]
    writer.write_table(pa.table({
        "doc_id": [shard_io.make_doc_id(key, batch.lines[i], batch.texts[i]) for i in held],
        "line": [batch.lines[i] for i in held], "text": [batch.texts[i] for i in held], "source": groups,
    }, schema=heldout_lib.HELDOUT_SCHEMA))
    tally.heldout += len(held)
    for group in groups:
        by_group.setdefault(group, [0, 0, 0])[2] += 1
    held_set = set(held)
    rest = [i for i in range(len(batch.texts)) if i not in held_set]
    return shard_io.ShardBatch(
        lines=[batch.lines[i] for i in rest], texts=[batch.texts[i] for i in rest],
        fields=[batch.fields[i] for i in rest], groups=[batch.groups[i] for i in rest], rejects=batch.rejects)


def _write_batch(batch, shard, classifier, threshold, writers, tally, reasons, histogram, by_group) -> None:
    if batch.rejects:
        tally.rejected += len(batch.rejects)
        reasons.update(reason_category(r.reason) for r in batch.rejects)
        writers["rejects"].write_table(pa.table(
            {"file": [shard.path] * len(batch.rejects), "line": [r.line for r in batch.rejects],
             "reason": [r.reason for r in batch.rejects], "snippet": [r.snippet for r in batch.rejects]},
            schema=REJECTS_SCHEMA,
        ))
    if not batch.texts:
        return
    normalized = [normalize_for_fasttext(t) for t in batch.texts]
    tally.chars_scored += sum(map(len, normalized))
    scores = classifier.score_normalized(normalized)
    keep = scores >= threshold
    histogram += np.histogram(scores, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]
    key = shard.key
    doc_ids = [shard_io.make_doc_id(key, line, text) for line, text in zip(batch.lines, batch.texts, strict=True)]
    n_kept = int(keep.sum())
    tally.kept += n_kept
    tally.dropped += len(keep) - n_kept
    for group, kept_flag in zip(batch.groups, keep.tolist(), strict=True):
        counts = by_group.setdefault(group if group is not None else heldout_lib.NO_SOURCE, [0, 0, 0])
        counts[0] += 1
        counts[1] += kept_flag
    scored = pa.table({"doc_id": doc_ids, "line": batch.lines, "text": batch.texts, "quality_score": scores,
                       "fields": batch.fields}, schema=KEPT_SCHEMA)
    if n_kept:
        writers["kept"].write_table(scored.filter(keep))
    if n_kept < len(keep):
        writers["dropped"].write_table(scored.select(DROPPED_SCHEMA.names).filter(~keep))


def count_source_records(pool_fs: Any, shard: shard_io.ShardFile) -> int:
    """Records in a shard counted independently of the parser: lines of the (decompressed) file, or rows."""
    with pool_fs.open(shard.path, "rb") as raw:
        if shard.format == "parquet":
            return pq.ParquetFile(raw).metadata.num_rows
        count, last = 0, b"\n"
        try:
            for chunk in shard_io.decompressed_chunks(raw, shard.format):
                count += chunk.count(b"\n")
                last = chunk[-1:]
        except (shard_io.TruncatedStreamError, zlib.error, zstandard.ZstdError):
            return count + 1  # the cut-off or corrupt tail is one rejected record
        return count + (0 if last == b"\n" else 1)


def verify_filtered_shard(storage: Storage, out_dir: str, source_records: int | None = None) -> tuple[bool, dict]:
    """Reconcile a filtered shard from its files alone: Parquet row counts against stats.json and the source."""
    stats = storage.read_json(f"{out_dir}/{STATS_FILE}")
    rows = {}
    for name, file in OUTPUT_FILES.items():
        with storage.open_read(f"{out_dir}/{file}") as handle:
            rows[name] = pq.ParquetFile(handle).metadata.num_rows
    total = rows["kept"] + rows["dropped"] + rows["rejects"] + rows["heldout"]
    details = {
        "rows_in": stats["rows_in"],
        "kept_rows": rows["kept"],
        "dropped_rows": rows["dropped"],
        "rejected_rows": rows["rejects"],
        "heldout_rows": rows["heldout"],
        "source_records": source_records,
    }
    ok = (
        total == stats["rows_in"]
        and rows["kept"] == stats["kept"]
        and rows["dropped"] == stats["dropped"]
        and rows["rejects"] == stats["rejected"]
        and rows["heldout"] == stats["heldout"]
        and (source_records is None or source_records == stats["rows_in"])
    )
    return ok, details


def keep_rate(kept: int, dropped: int) -> float:
    """Share of scored documents kept (rejected records were never scored), to four places."""
    return round(kept / max(kept + dropped, 1), 4)


def keep_rate_table(by_group: dict[str, dict[str, int]]) -> str:
    """Markdown table of documents scored and kept per group (source), largest group first, with the held-out
    documents set aside before scoring when the counts have them."""
    held = any("heldout" in c for c in by_group.values())
    rows = ["| group | documents | kept | keep rate |" + (" held out |" if held else ""),
            "|---|---:|---:|---:|" + ("---:|" if held else "")]
    for group, c in sorted(by_group.items(), key=lambda item: -item[1]["in"]):
        rate = f"{c['kept'] / c['in']:.1%}" if c["in"] else "n/a"
        rows.append(f"| {group} | {c['in']} | {c['kept']} | {rate} |" + (f" {c.get('heldout', 0)} |" if held else ""))
    return "\n".join(rows)


def read_shard_stats(storage: Storage, keys: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """``stats.json`` of each filtered shard, in order, and the keys without one (an incomplete run), left out."""
    found, incomplete = [], []
    for key in keys:
        stats_path = f"{layout.FILTERED_DIR.format(key=key)}/{STATS_FILE}"
        if storage.exists(stats_path):
            found.append(storage.read_json(stats_path))
        else:
            incomplete.append(key)
    return found, incomplete


@dataclass(frozen=True)
class PoolSummary:
    """Every filtered shard's stats merged: totals, the merged score histogram, and keep counts by group."""

    shard_stats: list[dict[str, Any]]
    totals: dict[str, int]  # rows_in, kept, dropped, rejected, heldout
    unbalanced: list[str]  # shards where rows_in != kept + dropped + rejected + heldout
    classifier_versions: list[str]
    bin_edges: list[float]
    counts: list[int]
    by_group: dict[str, dict[str, int]]
    threshold: float

    @property
    def reconciles(self) -> bool:
        """Every shard balances and all were filtered by one classifier."""
        return not self.unbalanced and len(self.classifier_versions) == 1

    def manifest(self) -> dict[str, Any]:
        """The filtered pool manifest later stages read: every shard's kept file, the classifier, the totals."""
        return {
            "shards": [{"key": s["shard_key"], "kept": s["kept"], **s["files"]["kept"]} for s in self.shard_stats],
            "classifier_versions": self.classifier_versions, **self.totals,
        }


def summarize_pool(shard_stats: list[dict[str, Any]]) -> PoolSummary:
    """Merge the stats of filtered shards (at least one; the histogram edges and threshold come from the first)."""
    by_group: dict[str, dict[str, int]] = {}
    for s in shard_stats:
        for group, c in s["by_group"].items():
            merged = by_group.setdefault(group, {"in": 0, "kept": 0, "heldout": 0})
            for count in merged:
                merged[count] += c.get(count, 0)
    return PoolSummary(
        shard_stats=shard_stats,
        totals={k: sum(s.get(k, 0) for s in shard_stats) for k in COUNTS},
        unbalanced=[s["shard_key"] for s in shard_stats
                    if s["rows_in"] != s["kept"] + s["dropped"] + s["rejected"] + s.get("heldout", 0)],
        classifier_versions=sorted({s["classifier_version"] for s in shard_stats}),
        bin_edges=shard_stats[0]["score_histogram"]["bin_edges"],
        counts=np.sum([s["score_histogram"]["counts"] for s in shard_stats], axis=0).tolist(),
        by_group=by_group,
        threshold=shard_stats[0]["threshold"],
    )
