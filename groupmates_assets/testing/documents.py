"""Hand-written documents for tests and benchmarks, and shard files of them in every pool format.

Explanatory prose ("good") and spam or boilerplate ("bad"), varied by templates: the quality classifier tells them
apart, so a pool of both exercises every branch of the filter.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

_TOPICS = ["rivers", "volcanoes", "glaciers", "forests", "deserts", "tides", "comets", "bridges", "engines",
           "libraries", "vaccines", "bees", "clocks", "maps", "bread", "salt", "glass", "paper", "radio", "trains"]
_GOOD = [
    "The study of {t} explains how natural and human processes shape the world, and researchers compare "
    "observations across decades to understand the causes behind each change.",
    "Historians describe how {t} influenced trade and settlement; the evidence comes from archives, surveys "
    "and careful measurement, which together allow a balanced account.",
    "An introduction to {t}: this article summarises the main ideas, defines the key terms and explains why "
    "the subject matters for science, engineering and everyday life.",
]
_BAD = [
    "CLICK HERE!!! best {t} deals $$$ free shipping buy now buy now limited offer login subscribe",
    "{t} {t} {t} cheap cheap cheap cheap online casino bonus win win win code 1234 promo",
    "Copyright (c) all rights reserved {t} menu home about contact privacy terms cookies sitemap",
]


def good_texts(n: int) -> list[str]:
    return [_GOOD[i % 3].format(t=_TOPICS[i % len(_TOPICS)]) + f" Section {i}." for i in range(n)]


def bad_texts(n: int) -> list[str]:
    return [_BAD[i % 3].format(t=_TOPICS[i % len(_TOPICS)]) + f" ref{i}" for i in range(n)]


def records(n_good: int, n_bad: int, offset: int = 0) -> list[dict]:
    """Pool records, good and bad interleaved, with distinct urls from ``offset`` on."""
    good = [{"text": t, "source": "prose", "url": f"doc://good/{offset + i}"} for i, t in enumerate(good_texts(n_good))]
    bad = [{"text": t, "source": "spam", "url": f"doc://bad/{offset + i}"} for i, t in enumerate(bad_texts(n_bad))]
    mixed = []
    for i in range(max(len(good), len(bad))):
        mixed.extend(x[i] for x in (good, bad) if i < len(x))
    return mixed


def jsonl_bytes(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def write_shard(path: Path, data: bytes) -> Path:
    """``data`` at ``path``, compressed as its suffix says (.gz, .zst, .zstd; reproducible bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith((".zst", ".zstd")):
        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
