"""The pool-to-selection path on any storage root, shared by the S3 test (``test_s3.py``) and its benchmark
(``bench/bench_s3.py``): materialize every asset from `pool_shard` to `selected_corpus` with tiny saved influence
models standing in for the influence stage, then compare two roots' artifacts file by file."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import torch

from groupmates_assets import settings as settings_module
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.pool.assets import embedded_pool, pool_shard
from groupmates_assets.defs.quality.assets import filtered_pool_shard, filtered_pool_summary, quality_classifier
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.selection import assets as sa
from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.storage import Storage

PROFILE = "s3-test"  # demo's pool and quality settings, small clusters
ASSETS = [embedded_pool, pool_shard, quality_classifier, filtered_pool_shard, filtered_pool_summary,
          sa.pool_predictions, sa.cluster_centroids, sa.cluster_assignments, sa.selected_documents,
          sa.selected_random, sa.selected_mates, sa.selected_fasttext, sa.selected_weighted, sa.selected_global,
          sa.selected_corpus]
RANGE_KEYS = sa.selected_documents.partitions_def.get_partition_keys()
BLOCKING_CHECKS = {"counts_reconcile", "all_shards_reconcile", "budgets_exact", "index_round_trip"}
# Files that name their own location or hold timings; all others must be byte-identical between two roots.
PATH_OR_TIMING_FILES = re.compile(r"pool/shards/[^/]+/manifest\.json|filtered_pool/_manifest\.json"
                                  r"|filtered_pool/[^/]+/(stats\.json|rejects\.parquet)")
TIMING_KEYS = {"seconds", "docs_per_second", "mb_per_second"}
# rejects.parquet names each malformed record's source file, so its size and hash (in stats.json) depend on where
# the pool is; its content is compared with the pool root set aside like any other file.
REJECTS_FILE, FILE_DIGEST_KEYS = re.compile(r"/rejects\.parquet$"), {"bytes", "sha256"}


def pipeline_profile() -> settings_module.Profile:
    selection = settings_module.SelectionProfile(mean_cluster_size=12, kmeans_iterations=5,
                                                 cluster_ranges=len(RANGE_KEYS), predict_batch_docs=16, torch_threads=1)
    return dataclasses.replace(settings_module.get_profile("demo"), name=PROFILE, description="S3 tests",
                               selection=selection)


def save_influence_models(directory: Path) -> None:
    """Tiny final and individual influence models (one encoder layer), saved under ``directory``/<kind>."""
    source = enc.resolve_encoder(None)
    tokenizer_json = enc.load_encoder_tokenizer(source).to_str()
    for kind, relational in (("final", True), ("individual", False)):
        torch.manual_seed(0)
        model = im.build_model(source, im.InfluenceModelConfig(relational=relational, chunk_len=16, chunks=2,
                                                               encoder_layers=1))
        im.save_model(model, str(directory / kind), tokenizer_json)


def seed_influence_models(storage: Storage, directory: Path) -> None:
    """Stand in for the influence stage (its own tests cover it): the saved models and their current.json."""
    for kind in ("final", "individual"):
        storage.put_dir(str(directory / kind), f"influence/models/{kind}/fp-{kind}", im.MODEL_FILES)
        storage.write_json(f"influence/models/{kind}/current.json", {
            "fingerprint": f"fp-{kind}", "path": f"influence/models/{kind}/fp-{kind}", "alpha": 1.0, "tau": 1.0})


def run_pool_to_selection(platform: PlatformResource, instance: dg.DagsterInstance, keys: list[str],
                          positives: str, models: Path) -> dict[str, Any]:
    """Materialize pool_shard -> quality_classifier -> filtered_pool_shard -> filtered_pool_summary ->
    pool_predictions -> cluster_centroids -> cluster_assignments -> selected_documents -> baselines and budget
    policies -> selected_corpus, one run per partition as the jobs do. Returns each materialization's metadata by
    ``asset[partition]`` and every run's events (to search for leaked secrets)."""
    metadata: dict[str, Any] = {}
    events: list[Any] = []

    def materialize(selection: list[str], partition_key: str | None = None, run_config: dict | None = None) -> None:
        result = dg.materialize(ASSETS, selection=selection, partition_key=partition_key, instance=instance,
                                resources={"platform": platform}, run_config=run_config)
        failed = [c.check_name for c in result.get_asset_check_evaluations()
                  if c.check_name in BLOCKING_CHECKS and not c.passed]
        assert not failed, f"{selection} {partition_key}: checks failed: {failed}"
        for name in selection:
            for event in result.asset_materializations_for_node(name):
                metadata[f"{name}[{partition_key}]" if partition_key else name] = event.metadata
        events.extend(result.all_events)

    instance.add_dynamic_partitions(pool_shards.name, keys)
    for key in keys:
        materialize(["pool_shard"], key)
    materialize(["quality_classifier"], run_config={"ops": {"quality_classifier": {"config": {
        "positives_path": positives}}}})
    for key in keys:
        materialize(["filtered_pool_shard"], key)
    materialize(["filtered_pool_summary"])
    seed_influence_models(platform.storage(), models)
    for key in keys:
        materialize(["pool_predictions"], key)
    materialize(["cluster_centroids"])
    for key in keys:
        materialize(["cluster_assignments"], key)
    for range_key in RANGE_KEYS:
        materialize(["selected_documents"], range_key)
    materialize(["selected_random", "selected_mates", "selected_fasttext"])
    materialize(["selected_weighted", "selected_global"])
    for key in keys:
        materialize(["selected_corpus"], key)
    return {"metadata": metadata, "events": events}


def _scrub(value: Any, roots: dict[str, str]) -> Any:
    """Roots replaced by their role and timings dropped, so two runs on different roots compare equal."""
    if isinstance(value, dict):
        volatile = TIMING_KEYS | (FILE_DIGEST_KEYS if REJECTS_FILE.search(str(value.get("path", ""))) else set())
        return {k: _scrub(v, roots) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [_scrub(v, roots) for v in value]
    if isinstance(value, str):
        for root, role in roots.items():
            value = value.replace(root, role)
    return value


def artifact_digests(storage: Storage, roots: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Every file under the storage root: relative path -> (sha256 of its bytes, sha256 of its content with the
    roots named in ``roots`` replaced and timings dropped; JSON and Parquet only)."""
    out = {}
    for full in storage.fs.find(storage.root):
        relative = full[len(storage.root.rstrip("/")) + 1:]
        data = storage.read_bytes(relative)
        if relative.endswith(".json"):
            normalized = json.dumps(_scrub(json.loads(data), roots), sort_keys=True).encode()
        elif relative.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            normalized = json.dumps([str(table.schema), _scrub(table.to_pylist(), roots)], default=repr).encode()
        else:
            normalized = data
        out[relative] = (hashlib.sha256(data).hexdigest(), hashlib.sha256(normalized).hexdigest())
    return out


def compare_roots(local: dict[str, tuple[str, str]], remote: dict[str, tuple[str, str]]) -> list[str]:
    """Assert both roots hold the same files with the same content; returns the files whose bytes differ
    (only those that name their own location or hold timings may)."""
    assert sorted(local) == sorted(remote)
    assert {k: v[1] for k, v in local.items()} == {k: v[1] for k, v in remote.items()}
    differ = sorted(k for k in local if local[k][0] != remote[k][0])
    assert all(PATH_OR_TIMING_FILES.fullmatch(k) for k in differ), differ
    return differ


def upload_dir(storage: Storage, local: Path) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.put_file(str(path), path.relative_to(local).as_posix())
