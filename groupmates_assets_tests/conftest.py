"""Shared fixtures: small pools of hand-written documents in every shard format."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

# A real S3 server (SeaweedFS on loopback): `s3_server` per module, `s3` per test with the test keys in the
# environment. Imported so that pytest registers the fixtures.
from groupmates_assets_tests.s3_server import s3, s3_server  # noqa: F401

# Hand-written documents: explanatory prose ("good") and spam/boilerplate ("bad"), varied by templates.
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
    good = [{"text": t, "source": "prose", "url": f"doc://good/{offset + i}"} for i, t in enumerate(good_texts(n_good))]
    bad = [{"text": t, "source": "spam", "url": f"doc://bad/{offset + i}"} for i, t in enumerate(bad_texts(n_bad))]
    mixed = []
    for i in range(max(len(good), len(bad))):
        mixed.extend(x[i] for x in (good, bad) if i < len(x))
    return mixed


def jsonl_bytes(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def write_shard(path: Path, data: bytes) -> Path:
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


@pytest.fixture
def small_pool(tmp_path: Path) -> dict[str, Path]:
    """Three shards (jsonl.zst, jsonl.gz, parquet) plus a positives file, all hand-written text."""
    pool = tmp_path / "pool"
    write_shard(pool / "crawl-a" / "part-0.jsonl.zst", jsonl_bytes(records(60, 60, 0)) + b'{"text": 7}\nnot json\n')
    write_shard(pool / "crawl-a" / "part-1.jsonl.gz", jsonl_bytes(records(40, 80, 100)))
    write_parquet(pool / "crawl-b.parquet", records(50, 50, 300))
    positives = write_shard(tmp_path / "positives.jsonl.zst",
                            jsonl_bytes([{"text": t + " Further reading follows.", "source": "reference"}
                                         for t in good_texts(150)]))
    return {"pool": pool, "positives": positives, "root": tmp_path}


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSTER_DISABLE_TELEMETRY", "1")
    os.environ.pop("GROUPMATES_PROFILE", None)
