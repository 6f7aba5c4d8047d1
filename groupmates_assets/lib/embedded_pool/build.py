"""Build the embedded default pool: mixed-quality real text as DCLM-format shards, byte-identical on rebuild.

The pool stands in for a web-crawl shard set when no external corpus is configured, so the pipeline can
run end to end from packages alone. Determinism comes from fixed source order, hash-based (not random)
subsampling, a seeded hash ordering for the shuffle, and single-shot zstd frames with no timestamps.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from groupmates_assets.lib.embedded_pool import sources as src
from groupmates_assets.lib.embedded_pool.sources import Document, SourceRead
from groupmates_assets.lib.storage import durable_replace

BUILDER_VERSION = "groupmates-embedded-pool/1"
ZSTD_LEVEL = 3
SHARD_DIR = "shards"
POSITIVES_DIR = "positives"
POSITIVES_NAME = "wikipedia-summaries-hq.jsonl.zst"
PROVENANCE_NAME = "provenance.json"
WIKI_SOURCE = "wikipedia-summaries"

# Order in which sources claim texts during cross-source de-duplication (higher quality first).
SOURCE_ORDER: tuple[str, ...] = (
    WIKI_SOURCE,
    "python-docs",
    "postgresql-docs",
    "foldoc",
    "jargon",
    "devils-dictionary",
    "vera",
    "fortunes",
    "debian-changelog",
    "debian-copyright",
)
# Without Debian's packages (no apt-get where the sources were fetched) the pool is the PyPI sources alone.
PYPI_ONLY_SOURCES: tuple[str, ...] = (WIKI_SOURCE, src.PACKAGE_DESCRIPTIONS)
PYPI_ONLY_NOTE = "building a smaller embedded pool from the PyPI sources alone"
# Per-source caps so no single large (mostly low-quality, very short) source dominates the pool.
SOURCE_CAPS: dict[str, int] = {"foldoc": 12_000, "vera": 5_000, "fortunes": 8_000}

PYTHON_DOCS_LICENCE = "PSF-2.0"
POSTGRESQL_DOCS_LICENCE = "PostgreSQL"


@dataclass(frozen=True)
class EmbeddedPoolResult:
    """Where the pool landed and what it holds (paths are absolute; shard paths sorted)."""

    shard_paths: list[str]
    positives_path: str
    provenance_path: str
    documents: int
    positives: int
    by_source: dict[str, int]
    pypi_only: bool = False  # built without Debian's packages (see PYPI_ONLY_SOURCES)


def default_cache_dir() -> str:
    """GROUPMATES_SOURCE_CACHE, else `<repo>/.groupmates/sources` (where fetch_pool_sources.sh downloads)."""
    env = os.environ.get("GROUPMATES_SOURCE_CACHE")
    if env:
        return env
    return str(Path(__file__).resolve().parents[3] / ".groupmates" / "sources")


def _hash64(*parts: str) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def is_positive_title(title: str, fraction: float) -> bool:
    """Stable held-out choice by title hash, so the same articles are positives on every build."""
    return _hash64("positive", title) < fraction * 2**64


def _shuffle_key(seed: int, doc: Document) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{doc.url}\x00{doc.text}".encode(), digest_size=16).digest()


def cap_documents(docs: list[Document], cap: int | None) -> list[Document]:
    """Keep the `cap` documents with the smallest text hash, in their original order (no RNG involved)."""
    if cap is None or len(docs) <= cap:
        return docs
    keep = set(sorted(range(len(docs)), key=lambda i: (_hash64("cap", docs[i].text), i))[:cap])
    return [d for i, d in enumerate(docs) if i in keep]


def _dedup(docs: Iterable[Document], seen: set[str]) -> list[Document]:
    out: list[Document] = []
    for doc in docs:
        if doc.text not in seen:
            seen.add(doc.text)
            out.append(doc)
    return out


def encode_records(docs: Iterable[Document]) -> bytes:
    """JSON lines with keys text, source, licence, title, url (in that order)."""
    lines = []
    for d in docs:
        record = {"text": d.text, "source": d.source, "licence": d.licence, "title": d.title, "url": d.url}
        lines.append(orjson.dumps(record) + b"\n")
    return b"".join(lines)


def _compress(data: bytes) -> bytes:
    # One-shot frame: fixed level, content size always written, no dictionary/threads -> stable bytes.
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    return compressor.compress(data)


def _atomic_write(path: str, data: bytes) -> str:
    """Write via a temporary name in the same directory, fsync, then rename (and fsync the directory); returns the
    sha256 of `data`."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    durable_replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _remove_others(directory: str, keep: set[str]) -> None:
    """Drop whatever a previous (e.g. larger) build left in a directory this builder owns."""
    for entry in os.listdir(directory):
        if entry in keep:
            continue
        path = os.path.join(directory, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _read_all(cache_dir: str, say: Callable[[str], None]) -> dict[str, SourceRead]:
    """Read every source; HTML pages (the slow part) are parsed on a process pool meanwhile."""
    reads: dict[str, SourceRead] = {}

    def keep(read: SourceRead) -> None:
        reads[read.name] = read
        say(f"read {len(read.documents):,} {read.name} documents")

    # Fast readers that can fail on a half-set-up machine go first, so a missing source fails in seconds.
    keep(src.read_wikipedia(cache_dir))
    tree = src.DebianTree(cache_dir)
    if not tree.available:
        say(f"{PYPI_ONLY_NOTE} (no Debian packages unpacked under {tree.root}: scripts/fetch_pool_sources.sh found no "
            "apt-get there)")
        keep(src.read_package_descriptions())
        return reads
    py_pkg, py_root, py_files = src.python_docs_files(tree)
    pg_pkg, pg_root, pg_files = src.postgresql_docs_files(tree)
    jobs = src.html_jobs(tree, "python-docs", PYTHON_DOCS_LICENCE, py_pkg, "sphinx", py_files)
    n_py = len(jobs)
    jobs += src.html_jobs(tree, "postgresql-docs", POSTGRESQL_DOCS_LICENCE, pg_pkg, "docbook", pg_files)

    def read_rest() -> None:
        for spec in src.DICT_SPECS:
            keep(src.read_dictd(spec, tree))
        keep(src.read_fortunes(tree))
        for read in src.read_debian_packaging(tree):
            keep(read)

    workers = _worker_count()
    if workers == 1:
        per_file = [src.html_file_documents(job) for job in jobs]
        read_rest()
    else:
        methods = multiprocessing.get_all_start_methods()
        # fork avoids re-importing the caller's packages in each worker; elsewhere use the default.
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = pool.map(src.html_file_documents, jobs, chunksize=8)
            try:
                read_rest()
                per_file = list(futures)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # don't finish parsing for a failed build
                raise
    for name, package, pattern, files, chunk in (
        ("python-docs", py_pkg, f"{tree.package_path(py_root)}/**/*.html", py_files, per_file[:n_py]),
        ("postgresql-docs", pg_pkg, f"{tree.package_path(pg_root)}/*.html", pg_files, per_file[n_py:]),
    ):
        read = SourceRead(
            name=name,
            package=package,
            version=tree.version(package),
            licence=PYTHON_DOCS_LICENCE if name == "python-docs" else POSTGRESQL_DOCS_LICENCE,
            how_read=f"{pattern} ({len(files)} pages) split on sections with html.parser",
            documents=[doc for docs in chunk for doc in docs],
        )
        keep(read)
    return reads


def build_embedded_pool(
    out_dir: str,
    *,
    num_shards: int = 16,
    positives_fraction: float = 0.4,
    cache_dir: str | None = None,
    seed: int = 1234,
    progress: Callable[[str], None] | None = None,
) -> EmbeddedPoolResult:
    """Build (or rebuild in place) the embedded pool under `out_dir`; see the package docstring."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0.0 <= positives_fraction < 1.0:
        raise ValueError(f"positives_fraction must be in [0, 1), got {positives_fraction}")
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    out = os.path.abspath(out_dir)
    cache = cache_dir if cache_dir is not None else default_cache_dir()

    reads = _read_all(cache, say)

    # Positives: a title-hash fraction of the Wikipedia summaries, held out of the pool entirely.
    wiki = reads[WIKI_SOURCE]
    positives = _dedup((d for d in wiki.documents if is_positive_title(d.title, positives_fraction)), set())
    positive_texts = {d.text for d in positives}

    seen: set[str] = set(positive_texts)
    pool: list[Document] = []
    stats: list[dict[str, object]] = []
    by_source: dict[str, int] = {}
    pypi_only = src.PACKAGE_DESCRIPTIONS in reads
    for name in PYPI_ONLY_SOURCES if pypi_only else SOURCE_ORDER:
        read = reads[name]
        unique = _dedup(read.documents, set())
        if name == WIKI_SOURCE:
            unique = [d for d in unique if d.text not in positive_texts]
        capped = cap_documents(unique, SOURCE_CAPS.get(name))
        kept = _dedup(capped, seen)
        pool.extend(kept)
        by_source[name] = len(kept)
        stats.append(
            {
                "name": name,
                "package": read.package,
                "version": read.version,
                "licence": read.licence,
                "how_read": read.how_read,
                "cap": SOURCE_CAPS.get(name),
                "documents_read": len(read.documents),
                "documents_positives": len(positives) if name == WIKI_SOURCE else 0,
                "documents_before_cap": len(unique),
                "documents_after_cap": len(capped),
                "documents_in_pool": len(kept),
            }
        )
    say(f"pool: {len(pool):,} documents from {len(by_source)} sources; {len(positives):,} positives held out")

    # Seeded hash order = a deterministic shuffle that every Python/platform reproduces.
    pool.sort(key=lambda d: _shuffle_key(seed, d))

    shard_dir = os.path.join(out, SHARD_DIR)
    pos_dir = os.path.join(out, POSITIVES_DIR)
    os.makedirs(shard_dir, exist_ok=True)
    os.makedirs(pos_dir, exist_ok=True)
    provenance_path = os.path.join(out, PROVENANCE_NAME)
    if os.path.exists(provenance_path):
        os.remove(provenance_path)  # an interrupted rebuild must not look complete

    positives_path = os.path.join(pos_dir, POSITIVES_NAME)
    pos_sha = _atomic_write(positives_path, _compress(encode_records(positives)))
    _remove_others(pos_dir, {POSITIVES_NAME})

    base, extra = divmod(len(pool), num_shards)
    shard_paths: list[str] = []
    shard_meta: list[dict[str, object]] = []
    start = 0
    for i in range(num_shards):
        size = base + (1 if i < extra else 0)
        name = f"pool-{i:05d}.jsonl.zst"
        path = os.path.join(shard_dir, name)
        sha = _atomic_write(path, _compress(encode_records(pool[start : start + size])))
        shard_paths.append(path)
        shard_meta.append({"path": f"{SHARD_DIR}/{name}", "documents": size, "sha256": sha})
        start += size
    _remove_others(shard_dir, {os.path.basename(p) for p in shard_paths})
    say(f"wrote {num_shards} shards and {len(positives):,} positives to {out}")

    provenance = {
        "builder": BUILDER_VERSION,
        "seed": seed,
        "registries": ["pypi"] if pypi_only else ["pypi", "debian"],
        "num_shards": num_shards,
        "positives_fraction": positives_fraction,
        "record_keys": ["text", "source", "licence", "title", "url"],
        "compression": f"zstd level {ZSTD_LEVEL}, one frame per file",
        "total_documents": len(pool),
        "by_source": by_source,
        "sources": stats,
        "shards": shard_meta,
        "positives": {
            "path": f"{POSITIVES_DIR}/{POSITIVES_NAME}",
            "source": WIKI_SOURCE,
            "documents": len(positives),
            "sha256": pos_sha,
            "selection": f"blake2b(title) < {positives_fraction} * 2**64; texts excluded from the pool",
        },
    }
    blob = (json.dumps(provenance, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    _atomic_write(provenance_path, blob)
    say(f"embedded pool built in {time.monotonic() - started:.1f}s")
    return EmbeddedPoolResult(
        shard_paths=sorted(shard_paths),
        positives_path=positives_path,
        provenance_path=provenance_path,
        documents=len(pool),
        positives=len(positives),
        by_source=by_source,
        pypi_only=pypi_only,
    )
