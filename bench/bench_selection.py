"""Group selection and clustering on 2 CPU cores.

Selection: 200,000 documents of 384-d in 100 clusters (2,000 each), ratio 0.5, the Gram-batched greedy of
``lib.selection.select_in_clusters`` against the reference code's structure (cluster by cluster, one
matrix-vector product per greedy step) in the same process on the same data; both must pick the same documents.
Clustering: faiss spherical k-means on the same points, the demo's k and iterations.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from bench.run import Figure
from groupmates_assets.lib import clustering
from groupmates_assets.lib import selection as sel
from groupmates_assets.settings import get_profile

DOCUMENTS, DIM, CLUSTERS = 200_000, 384, 100


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(DOCUMENTS, DIM)).astype(np.float32)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    u = rng.normal(size=DOCUMENTS).astype(np.float32)
    clusters = np.repeat(np.arange(CLUSTERS), DOCUMENTS // CLUSTERS)
    return h, u, clusters


def run(repeats: int = 3) -> list[Figure]:
    profile = get_profile("demo").selection
    torch.set_num_threads(profile.torch_threads)
    h, u, clusters = _data()
    budgets = sel.cluster_budgets(np.bincount(clusters), profile.ratio)
    started = time.perf_counter()
    reference = sel.select_reference_loop(h, u, clusters, budgets, 1.0, 1.0)
    reference_seconds = time.perf_counter() - started
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        ours = sel.select_in_clusters(h, u, clusters, budgets, 1.0, 1.0)
        best = min(best, time.perf_counter() - started)
    identical = bool(np.array_equal(ours.rows, reference.rows))
    differing = len(np.unique(ours.cluster[ours.rows != reference.rows]))
    # float32 rounding differs between a Gram matrix and matrix-vector products, so a near-tie can go either
    # way; in float64 both implementations must pick exactly the same documents.
    exact = bool(np.array_equal(sel.select_in_clusters(h, u, clusters, budgets, 1.0, 1.0, dtype=torch.float64).rows,
                                sel.select_reference_loop(h, u, clusters, budgets, 1.0, 1.0, dtype=np.float64).rows))
    print(f"[bench] selection: {best:.2f} s against {reference_seconds:.2f} s, identical={identical}, "
          f"float64 identical={exact}", file=sys.stderr)
    demo_docs = 20_407  # the demo's filtered pool
    k = sel.clusters_for(demo_docs, profile.mean_cluster_size)
    points = h[:demo_docs]
    started = time.perf_counter()
    result = clustering.train_spherical_kmeans(points, k, profile.kmeans_iterations, profile.kmeans_seed,
                                               profile.max_points_per_centroid, threads=profile.torch_threads)
    clustering.assign(points, result.centroids)
    kmeans_seconds = time.perf_counter() - started
    return [
        Figure("selection: Gram-batched greedy", round(best, 2), "s",
               f"{DOCUMENTS:,} x {DIM}-d in {CLUSTERS} clusters, ratio {profile.ratio}; "
               f"{DOCUMENTS / best:,.0f} documents/s; torch {profile.torch_threads} threads"),
        Figure("selection: reference loop (matrix-vector per step)", round(reference_seconds, 2), "s",
               f"same data; ours is {reference_seconds / best:.2f}x faster; float32: identical={identical} "
               f"({differing} of {CLUSTERS} clusters part at a float32 near-tie); float64: identical={exact}"),
        Figure("clustering: spherical k-means + assignment (demo size)", round(kmeans_seconds, 2), "s",
               f"{demo_docs:,} x {DIM}-d into {k} clusters, {profile.kmeans_iterations} iterations, faiss CPU"),
    ]
