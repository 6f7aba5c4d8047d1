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

# This process imports the definitions once, and their partitions and GPU requests come from the profile active
# then: always ``demo`` here, whatever the shell exports (a test that needs another profile registers one
# with ``use_profile``, or starts a process of its own). Step retries wait a tenth of a second, not seconds.
os.environ.pop("GROUPMATES_PROFILE", None)
os.environ.setdefault("GROUPMATES_RETRY_DELAY_SECONDS", "0.1")

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


def use_profile(monkeypatch: pytest.MonkeyPatch, profile) -> str:
    """Register ``profile`` (a ``settings.Profile``) and count this process's definitions as loaded with it, as
    GROUPMATES_PROFILE would at import, so ``PlatformResource(profile=profile.name)`` is accepted. Refused unless
    the profile builds the very partitions and GPU requests the definitions were imported with: no test may pass
    because of a run whose settings disagree with its partition keys. Returns the profile's name."""
    from groupmates_assets import settings
    from groupmates_assets.defs import deployment, partitions

    def built_by(p) -> dict:
        return {"oracle blocks": partitions.oracle_block_keys(p.oracle.blocks),
                "bootstrap blocks": partitions.oracle_block_keys(p.oracle.bootstrap_blocks),
                "selection ranges": partitions.selection_range_keys(p.selection.cluster_ranges),
                "pretraining GPU request": deployment.gpu_op_tags(p.pretrain.gpus_per_run)}

    imported = {"oracle blocks": partitions.oracle_random_blocks.get_partition_keys(),
                "bootstrap blocks": partitions.oracle_bootstrap_blocks.get_partition_keys(),
                "selection ranges": partitions.selection_ranges.get_partition_keys(),
                "pretraining GPU request": deployment.gpu_op_tags(deployment.pretrain_gpus())}
    wanted = built_by(profile)
    differ = {k: (imported[k], wanted[k]) for k in imported if imported[k] != wanted[k]}
    assert not differ, f"profile {profile.name!r} builds other definitions than the imported ones: {differ}"
    monkeypatch.setitem(settings.PROFILES, profile.name, profile)
    monkeypatch.setattr(settings, "_active_profile_name", profile.name)
    return profile.name


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
