"""Exact nearest-centroid search against faiss' approximate quantizers, at growing k, on 2 CPU cores.

`cluster_assignments` assigns every document to its nearest centroid with an exact ``IndexFlatIP`` search: O(k d)
per document, so with k proportional to the pool (the profiles' ``selection.mean_cluster_size``) the stage grows
as N^2. This benchmark asks whether an approximate quantizer over the centroids would buy linear growth, and at
what cost in documents that land in another cluster. For each k it times, on the same queries and centroids:

- exact: ``IndexFlatIP`` (what the asset runs);
- IVF: ``IndexIVFFlat`` with sqrt(k) lists over the centroids, ``nprobe`` 8 and 32;
- HNSW: ``IndexHNSWFlat`` (M = 32, built single-threaded, so deterministically), ``efSearch`` 64.

Each row gives the search time per million documents, the share of documents given the exact nearest centroid
("agreement"), and the speed-up over exact (above 1: faster), on two geometries of 384-d unit vectors (see
:func:`geometry`): the scale benchmark's planted clusters, and clusters that share topics.

Knobs: ``BENCH_CENTROID_QUERIES`` (documents searched, default 100,000), ``BENCH_CENTROID_KS`` (comma list,
default 1000,2000,4000,10000). Run: ``python -m bench.run --only centroid_search`` (a few minutes).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from bench.run import Figure

DIM = 384
KS = (1_000, 2_000, 4_000, 10_000)
QUERIES = 100_000
THREADS = 2
GEOMETRIES = ("planted", "topics")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def geometry(k: int, queries: int, kind: str = "planted", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, DIM], documents [queries, DIM]) of one of two kinds:

    - ``planted``: the scale benchmark's pool (``bench_scale.write_pool``): k random unit centres, documents
      around them with noise of norm 1.2, and the centres as the centroids (what k-means finds there);
    - ``topics``: documents around k / 20 random topics, and the centroids k more draws from the same
      distribution (k-means seeds from the documents), so that neighbouring centroids share a topic.
    """
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((k if kind == "planted" else max(2, k // 20), DIM)))

    def around(count: int) -> np.ndarray:
        noise = rng.standard_normal((count, DIM)) * 1.2 / np.sqrt(DIM)
        return _unit(centres[rng.integers(0, len(centres), count)] + noise)

    if kind == "planted":
        return centres, around(queries)
    if kind == "topics":
        return around(k), around(queries)
    raise ValueError(f"unknown geometry {kind!r}: planted or topics")


def _timed_search(index, documents: np.ndarray) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    _, ids = index.search(documents, 1)
    return time.perf_counter() - started, ids[:, 0]


def compare(k: int, queries: int, kind: str = "planted") -> list[dict]:
    """One row per search method at ``k`` on a ``kind`` geometry: seconds per million documents, agreement with
    exact, speed-up."""
    import faiss

    faiss.omp_set_num_threads(THREADS)
    centroids, documents = geometry(k, queries, kind)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(centroids)
    exact_seconds, truth = _timed_search(exact, documents)
    rows = [{"k": k, "geometry": kind, "method": "exact (IndexFlatIP)", "seconds": exact_seconds, "agreement": 1.0}]
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, max(2, int(np.sqrt(k))), faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 1  # a few centroids per list is the point here, not a warning
    ivf.train(centroids)
    ivf.add(centroids)
    for nprobe in (8, 32):
        ivf.nprobe = nprobe
        seconds, ids = _timed_search(ivf, documents)
        rows.append({"k": k, "geometry": kind, "method": f"IVF {ivf.nlist} lists, nprobe {nprobe}", "seconds": seconds,
                     "agreement": float((ids == truth).mean())})
    hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(1)  # a multithreaded HNSW build is not deterministic
    hnsw.add(centroids)
    faiss.omp_set_num_threads(THREADS)
    hnsw.hnsw.efSearch = 64
    seconds, ids = _timed_search(hnsw, documents)
    rows.append({"k": k, "geometry": kind, "method": "HNSW M 32, efSearch 64", "seconds": seconds,
                 "agreement": float((ids == truth).mean())})
    for row in rows:
        row["speedup"] = exact_seconds / row["seconds"]
        row["seconds_per_million"] = row["seconds"] * 1e6 / queries
    return rows


def run(repeats: int = 1) -> list[Figure]:
    del repeats  # one pass: the ratios come from the same run, and each search takes seconds
    ks = [int(k) for k in os.environ.get("BENCH_CENTROID_KS", ",".join(map(str, KS))).split(",")]
    queries = int(os.environ.get("BENCH_CENTROID_QUERIES", QUERIES))
    figures = []
    for kind in GEOMETRIES:
        for k in ks:
            for row in compare(k, queries, kind):
                label = f"centroid search, {kind}, k={k:,}: {row['method']}"
                print(f"[bench centroid_search] {label}: {row['seconds_per_million']:.1f} s per 1M, agreement "
                      f"{row['agreement']:.4f}, {row['speedup']:.2f}x exact", file=sys.stderr, flush=True)
                figures.append(Figure(label, round(row["seconds_per_million"], 1), "s per 1M documents",
                                      f"{row['speedup']:.2f}x exact; agreement with exact {row['agreement']:.4f}; "
                                      f"{queries:,} documents x {DIM}-d, {THREADS} threads"))
    return figures
