"""The platform on a real S3 server (SeaweedFS on loopback): Storage behaves as on a local folder, and the pool,
filter and selection stages write the same artifacts to ``s3://`` as to a local root, with ``s3://`` paths in
metadata, credentials from the environment only, and none of them in artifacts, metadata or logs.

The pipeline helpers live in ``groupmates_assets/testing/pool_to_selection.py``: ``bench/bench_s3.py`` times the same
path. No ``from __future__ import annotations``: an asset defined inside a test needs its resource annotations
resolvable."""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
from dagster_aws.s3 import S3Resource

from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.selection import assets as sa
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.storage import CACHE_DIR_ENV, Storage, fs_options
from groupmates_assets.testing.counting_proxy import counting_proxy
from groupmates_assets.testing.pool_to_selection import (
    PROFILE,
    artifact_digests,
    compare_roots,
    pipeline_profile,
    run_pool_to_selection,
    save_influence_models,
    seed_influence_models,
    upload_dir,
)
from groupmates_assets.testing.s3_server import S3Server
from groupmates_assets_tests import test_assets
from groupmates_assets_tests.conftest import use_profile
from groupmates_assets_tests.test_selection_assets import kept_table

pytestmark = pytest.mark.integration


def _contains(haystack: Iterable[Any], needle: str) -> bool:
    return any(needle in repr(item) for item in haystack)


# ------------------------------------------------------------------------------------------------------ tests


def _exercise(storage: Storage, scratch: Path) -> dict[str, Any]:
    """Every Storage operation the assets use; what a caller can observe, with the root cut from paths."""
    table = pa.table({"doc_id": ["x", "y"], "score": [0.1, 0.9]})
    array = np.arange(24, dtype=np.uint32).reshape(4, 6)
    infos = {"bytes": storage.write_bytes("a/b/data.bin", b"hello"),
             "json": storage.write_json("a/m.json", {"b": 1, "a": [1, 2]}),
             "parquet": storage.write_parquet("a/t.parquet", table),
             "numpy": storage.write_numpy("arrays/x.npy", array)}
    with pytest.raises(RuntimeError), storage.open_write("a/b/data.bin") as out:
        out.write(b"half of a new version")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError), storage.open_write("a/b/never.bin") as out:
        out.write(b"x" * 100_000)
        raise RuntimeError("killed mid-write")
    names = ["config.json", "sub/weights.bin"]
    (scratch / "model" / "sub").mkdir(parents=True)
    (scratch / "model" / "config.json").write_bytes(b'{"dim": 4}\n')
    (scratch / "model" / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    put = storage.put_dir(str(scratch / "model"), "models/m1", names)
    with storage.local_dir("models/m1", names) as local:
        fetched = {name: Path(local, name).read_bytes() for name in names}
    with storage.local_copy("a/b/data.bin") as local, open(local, "rb") as handle:
        copied = handle.read()
    mapped, whole = storage.read_numpy("arrays/x.npy"), storage.read_numpy("arrays/x.npy", mmap=False)
    root = storage.url("")
    observed = {
        "infos": {k: (i.path[len(root):], i.bytes, i.sha256) for k, i in {**infos, **put}.items()},
        "read": (storage.read_bytes("a/b/data.bin"), storage.read_json("a/m.json"),
                 storage.read_parquet("a/t.parquet").equals(table), storage.info("a/b/data.bin").sha256),
        "numpy": (mapped.dtype.str, mapped.shape, isinstance(mapped, np.memmap), mapped.flags.writeable,
                  mapped.tolist(), whole.flags.writeable, (whole == array).all()),
        "local_dir": fetched, "local_copy": copied,
        "all_files": sorted(p[len(storage.root) + 1:] for p in storage.fs.find(storage.root)),  # nothing partial
        "list": [storage.list(d) for d in ("", "a", "a/b", "models/m1", "absent")],
        "exists": [storage.exists(p) for p in ("a/b/data.bin", "a/b", "a/b/never.bin", "absent", "models/m1/sub")],
    }
    del mapped
    storage.remove("a/b/data.bin")
    storage.remove("models", recursive=True)
    storage.remove("absent")
    observed["after_remove"] = ([storage.exists(p) for p in ("a/b/data.bin", "models", "models/m1/config.json")],
                                storage.list(""), storage.list("a"))
    return observed


def test_storage_on_s3_behaves_as_on_a_local_folder(s3: S3Server, tmp_path: Path):
    (tmp_path / "local").mkdir()
    (tmp_path / "remote").mkdir()
    local = _exercise(Storage(str(tmp_path / "local-store")), tmp_path / "local")
    root = s3.url(f"{tmp_path.name}/store")
    storage = Storage(root, fs_options(root, endpoint_url=s3.endpoint_url))
    remote = _exercise(storage, tmp_path / "remote")
    assert remote == local
    assert storage.url("a/m.json") == f"s3://{s3.bucket}/{tmp_path.name}/store/a/m.json"
    assert local["all_files"] == ["a/b/data.bin", "a/m.json", "a/t.parquet", "arrays/x.npy", "models/m1/config.json",
                                  "models/m1/sub/weights.bin"]
    assert local["numpy"][2:4] == (True, False)  # a read-only memory map on both roots


def test_pool_filter_selection_on_s3_equal_local(s3: S3Server, small_pool, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    use_profile(monkeypatch, pipeline_profile())
    save_influence_models(tmp_path / "models")
    keys, positives = test_assets.KEYS, str(small_pool["positives"])
    prefix = s3.url(tmp_path.name)
    upload_dir(Storage(f"{prefix}/pool", fs_options(prefix, endpoint_url=s3.endpoint_url)), small_pool["pool"])
    platforms = {
        "local": PlatformResource(storage_root=str(tmp_path / "store"), pool_dir=str(small_pool["pool"]),
                                  profile=PROFILE),
        "s3": PlatformResource(storage_root=f"{prefix}/store", pool_dir=f"{prefix}/pool/", profile=PROFILE,
                               s3_endpoint_url=s3.endpoint_url),
    }
    runs = {}
    for name, platform in platforms.items():  # in-memory instances: a third of the sqlite one's run overhead
        with dg.DagsterInstance.ephemeral() as instance:
            runs[name] = run_pool_to_selection(platform, instance, keys, positives, tmp_path / "models")
    local = artifact_digests(platforms["local"].storage(), {str(tmp_path / "store"): "<store>",
                                                            str(small_pool["pool"]): "<pool>"})
    remote = artifact_digests(platforms["s3"].storage(), {f"{prefix}/store": "<store>", f"{prefix}/pool": "<pool>"})
    differ = compare_roots(local, remote)
    assert len(local) > 40 and "filtered_pool/crawl-b/kept.parquet" not in differ
    assert any(k.startswith("selected_corpus/group_mates/") for k in local)
    meta = runs["s3"]["metadata"]
    assert meta["pool_shard[crawl-b]"]["source_path"].value == f"{prefix}/pool/crawl-b.parquet"
    kept = meta["filtered_pool_shard[crawl-b]"]["kept_path"].value
    assert kept == f"{prefix}/store/filtered_pool/crawl-b/kept.parquet"
    assert meta["cluster_centroids"]["path"].value.startswith(f"{prefix}/store/selection/clusters/")
    assert meta["selected_corpus[crawl-b]"]["sha256"].value == runs["local"]["metadata"]["selected_corpus[crawl-b]"][
        "sha256"].value
    assert not _contains(runs["s3"]["events"], s3.secret_key)
    assert not _contains(meta.values(), s3.access_key)


def _predictions_downloads(s3: S3Server, root: str, keys: list[str], proxy, instance) -> list[int]:
    """Bytes the S3 server sent for each ``pool_predictions`` shard, each shard its own run as a backfill of one
    partition per run would be, all through ``proxy``."""
    platform = PlatformResource(storage_root=root, profile=PROFILE, s3_endpoint_url=proxy.endpoint_url)
    downloaded = []
    for key in keys:
        proxy.reset()
        dg.materialize([sa.pool_predictions], partition_key=key, instance=instance, resources={"platform": platform})
        downloaded.append(proxy.downloaded)
    return downloaded


def test_pool_predictions_download_the_models_once_per_machine(s3: S3Server, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    """Influence models on S3, one run per shard: without the local cache every run downloads both models; with
    it (keyed by each object's ETag) only the first does, in any later run or process, until a model changes."""
    use_profile(monkeypatch, pipeline_profile())
    save_influence_models(tmp_path / "models")
    keys = ["web-a", "web-b", "web-c"]
    root = s3.url(f"{tmp_path.name}/store")
    storage = Storage(root, fs_options(root, endpoint_url=s3.endpoint_url))
    seed_influence_models(storage, tmp_path / "models")
    shards = [storage.write_parquet(f"filtered_pool/{key}/kept.parquet", kept_table(key, 30)) for key in keys]
    model_bytes = sum((tmp_path / "models" / kind / name).stat().st_size for kind in ("final", "individual")
                      for name in im.MODEL_FILES)
    with dg.DagsterInstance.ephemeral() as instance, counting_proxy(s3.endpoint_url) as proxy:
        instance.add_dynamic_partitions(pool_shards.name, keys)
        monkeypatch.setenv(CACHE_DIR_ENV, "off")
        uncached = _predictions_downloads(s3, root, keys, proxy, instance)
        monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "object-cache"))
        cached = _predictions_downloads(s3, root, keys, proxy, instance)
        (tmp_path / "models" / "final" / im.CONFIG_FILE).write_text(
            (tmp_path / "models" / "final" / im.CONFIG_FILE).read_text() + "\n")  # same model, new object
        seed_influence_models(storage, tmp_path / "models")
        changed = _predictions_downloads(s3, root, keys[:1], proxy, instance)
    print(f"[model cache] bytes downloaded per pool_predictions shard: without the cache {uncached}, with it "
          f"{cached} (both models: {model_bytes:,} bytes; a shard's kept.parquet: {shards[0].bytes:,})")
    assert all(b > model_bytes for b in uncached)
    assert cached[0] > model_bytes and all(b < model_bytes / 10 for b in cached[1:])
    final_bytes = sum((tmp_path / "models" / "final" / name).stat().st_size for name in im.MODEL_FILES)
    assert final_bytes < changed[0] < final_bytes + model_bytes / 10  # only the changed model comes again
    assert sorted(p.name for p in (tmp_path / "object-cache").iterdir()) and not any(
        (p.stat().st_mode & 0o222) for p in (tmp_path / "object-cache").rglob("*") if p.is_file())  # read-only


def test_definitions_take_endpoint_from_env_and_offer_boto3(s3: S3Server, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """Production wiring: root and endpoint from GROUPMATES_* variables (endpoint as a Dagster EnvVar), keys from
    AWS_*; the ``s3`` resource (dagster-aws, boto3) reaches the same server without any configured secret."""
    from groupmates_assets.definitions import build_definitions

    monkeypatch.setenv("GROUPMATES_STORAGE_ROOT", s3.url(f"{tmp_path.name}/store"))
    monkeypatch.setenv("GROUPMATES_S3_ENDPOINT_URL", s3.endpoint_url)
    resources = build_definitions().resources
    assert isinstance(resources["platform"].s3_endpoint_url, dg.EnvVar)
    assert resources["s3"].aws_secret_access_key is None and resources["s3"].aws_access_key_id is None

    @dg.asset
    def probe(platform: PlatformResource, s3: S3Resource) -> dg.MaterializeResult:
        info = platform.storage().write_json("probe/hello.json", {"hello": "s3"})
        listed = s3.get_client().list_objects_v2(Bucket=info.path.split("/")[2], Prefix=f"{tmp_path.name}/store/")
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(info.path),
                                              "keys": dg.MetadataValue.json([o["Key"] for o in listed["Contents"]])})

    result = dg.materialize([probe], resources={"platform": resources["platform"], "s3": resources["s3"]})
    metadata = result.asset_materializations_for_node("probe")[0].metadata
    assert metadata["path"].value == s3.url(f"{tmp_path.name}/store/probe/hello.json")
    assert metadata["keys"].value == [f"{tmp_path.name}/store/probe/hello.json"]
    assert not _contains(result.all_events, s3.secret_key)


# The child process of the killed-upload test: it writes ``big.bin`` through Storage; at 101 MiB (two of s3fs's 50 MiB
# parts or more) s3fs uploads it as a multipart upload, in three parts. Every uploaded part is followed by a pause,
# so that the test can SIGKILL the writer after its first part and before the upload is completed.
SLOW_UPLOAD = """
import asyncio, os, sys
import s3fs
from groupmates_assets.lib.storage import Storage, fs_options

call_s3 = s3fs.S3FileSystem._call_s3

async def slow(self, method, *args, **kwargs):
    out = await call_s3(self, method, *args, **kwargs)
    if method == "upload_part":
        print("part uploaded", flush=True)
        await asyncio.sleep(60)
    return out

s3fs.S3FileSystem._call_s3 = slow
root = sys.argv[1]
Storage(root, fs_options(root, endpoint_url=sys.argv[2])).write_bytes("big.bin", os.urandom(101 << 20))
print("completed", flush=True)
"""


def test_an_upload_killed_mid_transfer_leaves_no_visible_object(s3: S3Server, tmp_path: Path, monkeypatch):
    """A real writer process is SIGKILLed in the middle of its multipart upload (one part sent, the upload not yet
    completed): the object's previous version stays as it was, nothing new is visible, and the next write from this
    machine deletes the killed writer's local staging file."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    import boto3

    root = s3.url(f"{tmp_path.name}/store")
    storage = Storage(root, fs_options(root, endpoint_url=s3.endpoint_url))
    storage.write_bytes("big.bin", b"the previous version")
    staging = tmp_path / "staging"
    staging.mkdir()
    env = {**os.environ, "TMPDIR": str(staging)}
    writer = subprocess.Popen([sys.executable, "-c", SLOW_UPLOAD, root, s3.endpoint_url], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == "part uploaded", writer.stderr.read()[-3000:]
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        writer.kill()
    assert "completed" not in writer.stdout.read()
    # its own keys: boto3.client() would reuse the process-wide default session, whose credentials an earlier
    # test module may have resolved against another server
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
                          aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
    pending = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=f"{tmp_path.name}/store/").get("Uploads", [])
    assert [u["Key"] for u in pending] == [f"{tmp_path.name}/store/big.bin"]  # killed mid-transfer, never completed
    fresh = Storage(root, fs_options(root, endpoint_url=s3.endpoint_url))
    assert fresh.read_bytes("big.bin") == b"the previous version" and fresh.list("") == ["big.bin"]
    assert [p.name.startswith("groupmates-upload-") for p in staging.iterdir()] == [True]  # the dead writer's
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    fresh.write_bytes("next.bin", b"next")
    assert list(staging.iterdir()) == []
