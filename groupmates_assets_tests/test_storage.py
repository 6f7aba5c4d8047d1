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


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_local_writes_fsync_the_file_before_the_rename_and_the_folder_after_it(tmp_path, monkeypatch):
    """Durable against a power cut, not only a killed process: the data reaches the disk before the final name
    points at it, the rename reaches it after (the folder's fsync), and so does every folder made for the file."""
    from groupmates_assets.lib import storage as storage_module

    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    storage = Storage(str(tmp_path / "root"))
    storage_module.make_dirs_durable(storage.root)
    events.clear()
    storage.write_bytes("new/sub/data.bin", b"payload")
    final = str(tmp_path / "root" / "new" / "sub" / "data.bin")
    (replace,) = [e for e in events if e[0] == "replace"]
    assert replace[2] == final
    at = events.index(replace)
    assert ("fsync", replace[1]) in events[:at], events  # the temporary file's data, before the rename
    assert ("fsync", os.path.dirname(final)) in events[at + 1:], events  # the rename, after it
    for folder in ("root", "root/new"):  # each new folder's entry in its parent
        assert ("fsync", str(tmp_path / folder)) in events[:at], events


def test_a_killed_writers_temporary_is_gone_after_the_next_write_into_its_folder(tmp_path):
    """A writer SIGKILLed with its data complete under the temporary name (a real process, killed at the failpoint
    between the data and the rename) leaves a hidden temporary; the next write into that folder, of any file,
    deletes it, and the killed file never appears."""
    import signal
    import subprocess
    import sys

    from groupmates_assets.lib import failpoints

    child = ("import sys; from groupmates_assets.lib.storage import Storage; "
             "Storage(sys.argv[1]).write_bytes('a/killed.bin', b'x' * 1000)")
    env = {**os.environ, failpoints.LOG_ENV: str(tmp_path / "points.log"), failpoints.KILL_AT_ENV: "1"}
    killed = subprocess.run([sys.executable, "-c", child, str(tmp_path / "root")], env=env, start_new_session=True,
                            capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = tmp_path / "root" / "a"
    (leftover,) = os.listdir(folder)
    assert leftover.startswith(".tmp-") and leftover.endswith("-killed.bin")
    storage = Storage(str(tmp_path / "root"))
    assert storage.list("a") == [] and not storage.exists("a/killed.bin")
    own = folder / f".tmp-{os.getpid()}-0-live.bin"  # a live writer's temporary stays
    own.write_bytes(b"in progress")
    storage.write_bytes("a/other.bin", b"next write")
    assert sorted(os.listdir(folder)) == sorted(["other.bin", own.name])
