"""One storage root for every artifact: a local folder by default, any fsspec URL (``s3://...``) in production.

Artifacts move between pipeline stages as files plus metadata. Every write here is atomic: the data goes
to a temporary name beside the final one and is renamed into place only once complete, so a reader never
sees a half-written file under its final name, and a killed write leaves nothing but a temporary file that
the next write into the same folder deletes. On a local root the write is also durable: the file is fsynced
before the rename and its folder after it (and a folder made for it, in its parent), so after a power cut the
final name holds either the old or the new bytes, never a file the kernel had not yet written out. Object stores
have no rename, but an upload becomes visible only once complete (one PUT, or a multipart upload that is completed
last), so there the data is staged in a local temporary file and uploaded only when the block writing it
succeeded: a failed or killed write uploads nothing visible.

S3 credentials never pass through here: s3fs (botocore) reads them from the environment, ``~/.aws`` or an
instance role. Only the endpoint (S3-compatible servers) and the region are options (`fs_options`).

Files that loaders need on a local disk and that many runs read (models, the probe checkpoint, a classifier) are
downloaded from an object store once per machine: `local_dir` and `local_copy` with ``cache=True`` keep them in a
local cache keyed by each object's ETag (see `object_cache_dir`), so a later run, in any process, reuses them
until the object changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from groupmates_assets.lib import failpoints

_TMP_MARK = ".tmp-"
_UPLOAD_MARK = "groupmates-upload-"  # a staged upload's local file: groupmates-upload-<pid>-<random>-<name>
_S3_PROTOCOLS = ("s3", "s3a")
S3_ENDPOINT_ENV = "GROUPMATES_S3_ENDPOINT_URL"  # an S3-compatible server (MinIO, SeaweedFS, ...); AWS when unset
S3_REGION_ENV = "GROUPMATES_S3_REGION"  # unset: botocore's own chain (AWS_REGION, AWS_DEFAULT_REGION, ~/.aws)
CACHE_DIR_ENV = "GROUPMATES_CACHE_DIR"  # the local cache of downloaded objects; "off": download every time
CACHE_MAX_BYTES_ENV = "GROUPMATES_CACHE_MAX_BYTES"  # above this the least recently used entries are removed
DEFAULT_CACHE_MAX_BYTES = 20 << 30
CACHE_KEEP_SECONDS = 3600  # an entry used this recently is never removed (another process may be reading it)
# What identifies an object's content in its fsspec info, by backend: S3's ETag, GCS's generation, Azure's etag.
_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash")


class StoragePathError(ValueError):
    """A relative artifact path that would escape the storage root or is otherwise unsafe."""


@dataclass(frozen=True)
class ArtifactInfo:
    """What an asset reports about a file it wrote."""

    path: str
    bytes: int
    sha256: str

    def as_metadata(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}path": self.path, f"{prefix}bytes": self.bytes, f"{prefix}sha256": self.sha256}


class _HashingWriter(io.RawIOBase):
    """Wraps a binary sink and hashes/counts what goes through it, so hashing costs no second read."""

    def __init__(self, sink: IO[bytes]):
        self._sink = sink
        self.digest = hashlib.sha256()
        self.size = 0
        self.info: ArtifactInfo | None = None  # set once the artifact is in place under its final name

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        self._sink.write(view)
        return view.nbytes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: IO[bytes], chunk_size: int = 4 << 20) -> tuple[str, int]:
    """Hash a binary stream in chunks; returns (hex digest, size in bytes)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(chunk_size):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def validate_relative_path(relative: str) -> str:
    """Reject absolute paths, `..` segments, empty segments and control characters before they become paths."""
    if not relative or relative.startswith("/") or "\\" in relative:
        raise StoragePathError(f"artifact path must be relative and use '/': {relative!r}")
    parts = relative.split("/")
    for part in parts:
        if part in ("", ".", "..") or any(ord(ch) < 32 for ch in part):
            raise StoragePathError(f"unsafe segment {part!r} in artifact path {relative!r}")
    return relative


def fs_options(url: str, endpoint_url: str = "", region: str = "") -> dict[str, Any]:
    """fsspec options for ``url``: none for local paths; for ``s3://`` the endpoint and region (given, else from
    $GROUPMATES_S3_ENDPOINT_URL / $GROUPMATES_S3_REGION, else botocore's defaults, which include
    $AWS_ENDPOINT_URL) and no listings cache, so a long-lived process (a sensor) sees objects that other
    processes wrote, as it would on a local folder. Never credentials: those stay with botocore's default chain."""
    if fsspec.utils.get_protocol(url) not in _S3_PROTOCOLS:
        return {}
    endpoint_url = endpoint_url or os.environ.get(S3_ENDPOINT_ENV, "")
    region = region or os.environ.get(S3_REGION_ENV, "")
    client = {k: v for k, v in (("endpoint_url", endpoint_url), ("region_name", region)) if v}
    return {"use_listings_cache": False, **({"client_kwargs": client} if client else {})}


class Storage:
    """A storage root addressed by relative, '/'-separated artifact paths."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        """``storage_options`` go to fsspec; None: `fs_options` of the root (the environment's S3 endpoint)."""
        if not root:
            raise StoragePathError("storage root is empty")
        options = fs_options(root) if storage_options is None else storage_options
        self.fs, root_path = fsspec.core.url_to_fs(root, **options)
        self.is_local = "file" in _protocols(self.fs)
        self.root = os.path.abspath(root_path) if self.is_local else root_path.rstrip("/")
        self._url_prefix = "" if self.is_local else f"{_protocols(self.fs)[0]}://"

    # -- addressing -------------------------------------------------------------------------------------
    def path(self, relative: str) -> str:
        """The full path (as the filesystem sees it) of an artifact; ``""`` is the root itself."""
        if relative == "":
            return self.root
        return posixpath.join(self.root, validate_relative_path(relative))

    def url(self, relative: str) -> str:
        """A path a user can paste: a local absolute path or an ``s3://`` URL."""
        return self._url_prefix + self.path(relative)

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def list(self, relative_dir: str) -> list[str]:
        """Names (not paths) directly under a directory, sorted; temporary files are hidden."""
        full = self.path(relative_dir)
        if not self.fs.exists(full):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(full, detail=False)]
        return sorted(n for n in names if not n.startswith(_TMP_MARK))

    def remove(self, relative: str, recursive: bool = False) -> None:
        full = self.path(relative)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=recursive)
            if recursive and hasattr(self.fs, "call_s3") and self.fs.exists(full):
                self._remove_s3_folders(full)

    def _remove_s3_folders(self, full: str) -> None:
        """S3 servers with real folders (SeaweedFS) can keep emptied ones after s3fs's bulk delete, so the path
        would still exist; deleting each one's ``folder/`` key, deepest first, removes them as a local ``rm -r``
        does. AWS S3 has no folders: an emptied prefix is gone and this is never reached."""
        for entry in self.fs.ls(full, detail=True):
            if entry["type"] == "directory" and entry["name"].rstrip("/") != full.rstrip("/"):
                self._remove_s3_folders(entry["name"])
        bucket, key, _ = self.fs.split_path(full)
        self.fs.call_s3("delete_object", Bucket=bucket, Key=key.rstrip("/") + "/")
        self.fs.invalidate_cache(full)

    # -- writing ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, relative: str) -> Iterator[_HashingWriter]:
        """Open an artifact for binary writing; it appears under its final name only if the block succeeds."""
        final = self.path(relative)
        if self.is_local:
            parent = posixpath.dirname(final)
            make_dirs_durable(parent)
            _remove_dead_writers_files(parent)
            tmp = posixpath.join(parent, f"{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}-{posixpath.basename(final)}")
            handle = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
        else:  # staged locally: an object store has no rename, and a half-written upload must never land
            # the suffix keeps the extension, from which s3fs guesses the object's Content-Type
            _remove_dead_writers_files(tempfile.gettempdir(), _UPLOAD_MARK)
            fd, tmp = tempfile.mkstemp(prefix=f"{_UPLOAD_MARK}{os.getpid()}-",
                                       suffix=f"-{posixpath.basename(final)[-80:]}")
            handle = os.fdopen(fd, "wb")
        writer = _HashingWriter(handle)
        try:
            yield writer
            if self.is_local:
                handle.flush()
                os.fsync(handle.fileno())  # the data on disk before the name points at it
            handle.close()
            failpoints.hit("storage.write.complete")  # the data is whole under its temporary name only
            if self.is_local:
                os.replace(tmp, final)
                fsync_dir(parent)  # the rename itself on disk
            else:
                self.fs.put_file(tmp, final)  # one PUT, or a multipart upload completed last: all or nothing
            failpoints.hit("storage.write.visible")
        except BaseException:
            with contextlib.suppress(Exception):
                handle.close()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)  # a failed write's data; nothing left once renamed into place
        writer.info = ArtifactInfo(self.url(relative), writer.size, writer.digest.hexdigest())

    def write_bytes(self, relative: str, data: bytes) -> ArtifactInfo:
        with self.open_write(relative) as out:
            out.write(data)
        return out.info

    def write_json(self, relative: str, obj: Any) -> ArtifactInfo:
        """JSON manifests: sorted keys and a trailing newline, so equal content gives equal bytes."""
        data = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        return self.write_bytes(relative, data)

    def write_parquet(self, relative: str, table: pa.Table, compression: str = "zstd",
                      row_group_sizes: Sequence[int] | None = None, **options: Any) -> ArtifactInfo:
        """A Parquet file; ``row_group_sizes`` (rows per row group, in order, summing to the table's rows) cuts
        the row groups where a reader will want to skip (see `read_parquet_where`); ``options`` go to pyarrow's
        writer (``use_dictionary``, ``column_encoding``)."""
        if row_group_sizes is None:
            with self.open_write(relative) as out:
                pq.write_table(table, out, compression=compression, **options)
            return out.info
        if sum(row_group_sizes) != table.num_rows or any(size <= 0 for size in row_group_sizes):
            raise ValueError(f"row groups of {list(row_group_sizes)} rows do not cut a table of {table.num_rows}")
        with self.open_write(relative) as out, pq.ParquetWriter(out, table.schema, compression=compression,
                                                                **options) as writer:
            offset = 0
            for size in row_group_sizes:
                writer.write_table(table.slice(offset, size), row_group_size=size)
                offset += size
        return out.info

    def write_numpy(self, relative: str, array: np.ndarray) -> ArtifactInfo:
        """A ``.npy`` file (no pickled objects), memory-mappable when read back from a local root."""
        with self.open_write(relative) as out:
            np.save(out, np.ascontiguousarray(array), allow_pickle=False)
        return out.info

    def put_file(self, local_path: str, relative: str) -> ArtifactInfo:
        """Copy a local file (e.g. a model a library wrote to disk) into the store, atomically."""
        if not self.is_local:  # one upload straight from the file: no staging copy needed
            with open(local_path, "rb") as src:
                digest, size = sha256_stream(src)
            self.fs.put_file(local_path, self.path(relative))
            return ArtifactInfo(self.url(relative), size, digest)
        with open(local_path, "rb") as src, self.open_write(relative) as out:
            while chunk := src.read(4 << 20):
                out.write(chunk)
        return out.info

    # -- reading ----------------------------------------------------------------------------------------
    def open_read(self, relative: str) -> IO[bytes]:
        return self.fs.open(self.path(relative), "rb")

    def read_bytes(self, relative: str) -> bytes:
        if not self.is_local:  # one GET; opening an object first costs a HEAD for its size
            return self.fs.cat_file(self.path(relative))
        with self.open_read(relative) as handle:
            return handle.read()

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def read_parquet(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        with self.open_read(relative) as handle:
            return pq.read_table(handle, columns=columns)

    def parquet_rows(self, relative: str) -> int:
        """Rows of a Parquet file, from its footer alone."""
        with self._open_selective(relative) as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    def read_parquet_where(self, relative: str, column: str, lowest: Any, highest: Any,
                           columns: list[str] | None = None) -> pa.Table:
        """The rows whose ``column`` lies in [lowest, highest], reading only the row groups whose statistics say
        they can hold such rows (plus the footer): a file sorted by ``column`` with row groups cut at the ranges
        its readers ask for is read range by range, never whole."""
        with self._open_selective(relative) as handle:
            parquet = pq.ParquetFile(handle)
            groups = overlapping_row_groups(parquet.metadata, column, lowest, highest)
            wanted = columns if columns is None or column in columns else [*columns, column]
            table = parquet.read_row_groups(groups, columns=wanted) if groups else \
                parquet.schema_arrow.empty_table().select(wanted or parquet.schema_arrow.names)
        values = table.column(column)
        table = table.filter(pc.and_(pc.greater_equal(values, lowest), pc.less_equal(values, highest)))
        return table.select(columns) if columns is not None else table

    @contextlib.contextmanager
    def _open_selective(self, relative: str) -> Iterator[IO[bytes]]:
        """A handle for reading parts of a file: on an object store without read-ahead, so a request fetches
        only the bytes asked for (s3fs's default read-ahead would fetch megabytes past each column chunk)."""
        if self.is_local:
            with self.open_read(relative) as handle:
                yield handle
            return
        with self.fs.open(self.path(relative), "rb", cache_type="none") as handle:
            yield handle

    def read_numpy(self, relative: str, mmap: bool = True, cache: bool = False) -> np.ndarray:
        """A ``.npy`` array, read whole, or with ``mmap`` memory-mapped read-only (pages load on demand).

        An object cannot be memory-mapped, so a remote array is first downloaded to a local temporary file;
        the file is unlinked at once (the mapping keeps it alive), so its disk space returns with the array;
        with ``cache`` it is kept in the local object cache instead, for later runs (see `local_dir`).
        """
        if self.is_local and mmap:
            return np.load(self.path(relative), mmap_mode="r", allow_pickle=False)
        if mmap and cache and (cached := self._cached_entry(posixpath.dirname(relative),
                                                             [posixpath.basename(relative)])):
            return np.load(os.path.join(cached, posixpath.basename(relative)), mmap_mode="r", allow_pickle=False)
        if mmap:
            fd, tmp = tempfile.mkstemp(prefix="groupmates-", suffix=".npy")
            os.close(fd)
            try:
                self.fs.get_file(self.path(relative), tmp)
                return np.load(tmp, mmap_mode="r", allow_pickle=False)
            finally:
                os.remove(tmp)
        with self.open_read(relative) as handle:
            return np.load(io.BytesIO(handle.read()), allow_pickle=False)

    def info(self, relative: str) -> ArtifactInfo:
        with self.open_read(relative) as handle:
            digest, size = sha256_stream(handle)
        return ArtifactInfo(self.url(relative), size, digest)

    @contextlib.contextmanager
    def local_copy(self, relative: str, cache: bool = False) -> Iterator[str]:
        """A local filesystem path for libraries that only read local files (fastText); no copy when local.
        From an object store with ``cache``, the file comes from the local cache (`object_cache_dir`), downloaded
        only if the object changed since: read it, never write it (it is read-only)."""
        if self.is_local:
            yield self.path(relative)
            return
        name = posixpath.basename(relative)
        if cache and (cached := self._cached_entry(posixpath.dirname(relative), [name])):
            yield os.path.join(cached, name)
            return
        with tempfile.TemporaryDirectory(prefix="groupmates-") as tmp:
            target = os.path.join(tmp, posixpath.basename(relative))
            self.fs.get_file(self.path(relative), target)  # get_file: no glob expansion of the name
            yield target

    @contextlib.contextmanager
    def local_dir(self, relative_dir: str, names: Iterable[str], cache: bool = False) -> Iterator[str]:
        """A local directory holding ``names`` (paths inside ``relative_dir``, sub-folders allowed) for loaders
        that read a directory (checkpoints, models); no copy when the storage root is local. From an object
        store with ``cache`` (for what many runs read: models), the files come from the local cache
        (`object_cache_dir`), downloaded only when an object changed since: read them, never write them (they are
        read-only). Without it, a temporary copy removed on exit (what one run reads once: a checkpoint)."""
        if self.is_local:
            yield self.path(relative_dir)
            return
        names = list(names)
        if cache and (cached := self._cached_entry(relative_dir, names)):
            yield cached
            return
        with tempfile.TemporaryDirectory(prefix="groupmates-") as tmp:
            self._download(relative_dir, names, tmp)
            yield tmp

    def _download(self, relative_dir: str, names: Sequence[str], target_dir: str) -> None:
        for name in names:
            target = os.path.join(target_dir, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.get_file(self.path(f"{relative_dir}/{name}" if relative_dir else name), target)

    def _cached_entry(self, relative_dir: str, names: Sequence[str]) -> str | None:
        """A local folder holding ``names`` of ``relative_dir`` as they are in the store now, downloaded into the
        cache unless an earlier download of the same object versions is there; None when there is no cache
        (turned off, or a backend whose listing names no version)."""
        cache = object_cache_dir()
        if cache is None:
            return None
        versions = [self.object_version(f"{relative_dir}/{name}" if relative_dir else name) for name in names]
        if None in versions:
            return None
        key = hashlib.sha256(json.dumps([self.url(relative_dir), list(names), versions]).encode()).hexdigest()
        entry = os.path.join(cache, key[:32])
        if os.path.isdir(entry):
            os.utime(entry)  # recently used: the last to be evicted
            return entry
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=_TMP_MARK, dir=cache)
        try:
            self._download(relative_dir, names, staging)
            for name in names:
                os.chmod(os.path.join(staging, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.rename(staging, entry)  # whole or absent; if another process was first, its copy is the same
        except OSError:
            if not os.path.isdir(entry):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        prune_cache(cache, int(os.environ.get(CACHE_MAX_BYTES_ENV) or DEFAULT_CACHE_MAX_BYTES), keep=entry)
        return entry

    def object_version(self, relative: str) -> str | None:
        """What identifies the object's current content (its ETag on S3, with its size); None when the backend
        names none, e.g. a local or in-memory filesystem."""
        info = self.fs.info(self.path(relative))
        version = next((info[key] for key in _VERSION_KEYS if info.get(key)), None)
        return f"{version}:{info.get('size')}" if version is not None else None

    def put_dir(self, local_dir: str, relative_dir: str, names: Iterable[str]) -> dict[str, ArtifactInfo]:
        """Upload ``names`` from a local directory, each file written atomically, in the order given (so a
        completion marker listed last lands last)."""
        return {name: self.put_file(os.path.join(local_dir, name), f"{relative_dir}/{name}") for name in names}


def object_cache_dir() -> str | None:
    """Where files downloaded from an object store are kept for later runs: $GROUPMATES_CACHE_DIR, default
    ``~/.cache/groupmates/objects``; ``off`` turns the cache off. Point it at a volume that outlives the step's
    container (a node-local disk) for the cache to work across runs on Kubernetes or ECS."""
    value = os.environ.get(CACHE_DIR_ENV, "")
    if value == "off":
        return None
    return value or os.path.join(os.path.expanduser("~"), ".cache", "groupmates", "objects")


def prune_cache(cache: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Remove the least recently used entries until the cache holds at most ``max_bytes``; entries used in the
    last hour (and ``keep``) stay, since another process may be reading them. Returns the entries removed."""
    entries = []
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if name.startswith(_TMP_MARK) or not os.path.isdir(path):
            continue
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        entries.append((os.path.getmtime(path), size, path))
    total, removed = sum(size for _, size, _ in entries), []
    for used, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if path == keep or time.time() - used < CACHE_KEEP_SECONDS:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size
        removed.append(path)
    return removed


def overlapping_row_groups(metadata: pq.FileMetaData, column: str, lowest: Any, highest: Any) -> list[int]:
    """Row groups whose ``column`` statistics overlap [lowest, highest]; a group without statistics is kept."""
    if metadata.num_row_groups == 0:
        return []
    first = metadata.row_group(0)
    index = next((i for i in range(first.num_columns) if first.column(i).path_in_schema == column), None)
    if index is None:
        raise KeyError(f"no column {column!r} in the Parquet file")
    groups = []
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(index).statistics
        if stats is None or not stats.has_min_max or (stats.max >= lowest and stats.min <= highest):
            groups.append(group)
    return groups


def _remove_dead_writers_files(parent: str, mark: str = _TMP_MARK) -> None:
    """Temporary files in ``parent`` (named ``<mark><pid>-...``) left by writers that died mid-write (SIGKILL, power
    cut): their process is gone, so nothing will rename or upload them; a live writer's (its PID still runs) is left
    alone. Any write into the folder clears them, not only the next write of the same file, so a rerun that writes
    elsewhere in the folder leaves none behind."""
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.startswith(mark):
            continue
        pid = entry[len(mark):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(parent, entry))


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, with each folder it creates fsynced into its parent, so a file renamed
    into a new folder survives a power cut together with the folder."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    os.makedirs(path, exist_ok=True)
    for folder in reversed(missing):
        fsync_dir(os.path.dirname(folder))


def durable_replace(tmp: str, final: str) -> None:
    """Rename a complete, already fsynced file into place and fsync its folder (for writers outside `Storage`)."""
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
