"""Storage root: atomic writes, hashes, safe paths."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pytest

from groupmates_assets.lib.storage import Storage, StoragePathError

pytestmark = pytest.mark.unit


def test_writes_are_atomic_and_hashed(tmp_path):
    storage = Storage(str(tmp_path))
    info = storage.write_bytes("a/b/data.bin", b"hello")
    assert info.sha256 == hashlib.sha256(b"hello").hexdigest() and info.bytes == 5
    assert storage.read_bytes("a/b/data.bin") == b"hello"
    with pytest.raises(RuntimeError), storage.open_write("a/b/data.bin") as out:
        out.write(b"half of a new version")
        raise RuntimeError("killed mid-write")
    assert storage.read_bytes("a/b/data.bin") == b"hello"  # old version intact
    assert os.listdir(tmp_path / "a" / "b") == ["data.bin"]  # no temporary left behind
    assert storage.info("a/b/data.bin") == info


def test_json_and_parquet_round_trip(tmp_path):
    storage = Storage(str(tmp_path))
    first = storage.write_json("m.json", {"b": 1, "a": [1, 2]})
    assert storage.read_json("m.json") == {"a": [1, 2], "b": 1}
    assert storage.write_json("m.json", {"a": [1, 2], "b": 1}).sha256 == first.sha256  # canonical bytes
    table = pa.table({"doc_id": ["x", "y"], "score": [0.1, 0.9]})
    storage.write_parquet("t.parquet", table)
    assert storage.read_parquet("t.parquet").equals(table)
    assert storage.list("") == ["m.json", "t.parquet"]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../up", "a/../../b", "a//b", "a/./b", "a\\b", "x\x00y"])
def test_unsafe_paths_are_refused(tmp_path, bad):
    with pytest.raises(StoragePathError):
        Storage(str(tmp_path)).path(bad)


def test_memory_filesystem_url_root():
    storage = Storage("memory://groupmates-test")
    storage.write_bytes("x/y.txt", b"z")
    assert storage.read_bytes("x/y.txt") == b"z" and storage.url("x/y.txt").startswith("memory://")
    with storage.local_copy("x/y.txt") as local, open(local, "rb") as handle:
        assert handle.read() == b"z"


def test_numpy_round_trip_local_and_remote(tmp_path):
    import numpy as np

    array = np.arange(12, dtype=np.uint32).reshape(3, 4)
    for root in (str(tmp_path), f"memory://np-{tmp_path.name}"):
        storage = Storage(root)
        storage.write_numpy("a/x.npy", array)
        loaded = storage.read_numpy("a/x.npy")
        assert loaded.dtype == np.uint32 and (loaded == array).all()
