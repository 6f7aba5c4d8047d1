"""Spherical k-means on the influence model's embeddings h (method.md Stage 12), with faiss.

Trained on a seeded sample of at most ``max_points_per_centroid x k`` points (what faiss would subsample to
anyway, drawn here so the sample is explicit and reproducible), centroids re-normalised every iteration;
assignment by the largest inner product with the unit-norm centroids (= cosine, since the centroids are unit
norm and ranking is per point). GPU faiss is used when it is installed and a GPU is visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # [k, d] float32, unit norm
    sample_size: int
    objective: list[float]  # faiss' objective per iteration (sum of inner products)
    gpu: bool


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    try:
        faiss = _faiss()
        return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def train_spherical_kmeans(points: np.ndarray, k: int, iterations: int, seed: int,
                           max_points_per_centroid: int = 256, threads: int | None = None) -> KMeansResult:
    """Centroids of ``k`` clusters. ``points`` may be a memmap; only the sample is loaded.

    ``k`` above the number of points is an error here (faiss would fail inside C++); the selection stage picks
    ``k`` with :func:`groupmates_assets.lib.selection.clusters_for`, which clamps it to the documents there are.
    """
    n, dim = points.shape
    if k < 1 or k > n:
        raise ValueError(f"cannot form {k} clusters from {n} documents (need 1 <= k <= documents)")
    faiss = _faiss()
    if threads:
        faiss.omp_set_num_threads(threads)
    budget = max_points_per_centroid * k
    rows = np.sort(np.random.default_rng(seed).choice(n, size=budget, replace=False)) if n > budget else np.arange(n)
    sample = np.ascontiguousarray(np.asarray(points[rows], dtype=np.float32))
    use_gpu = gpu_available()
    kmeans = faiss.Kmeans(dim, k, niter=iterations, seed=seed, spherical=True, gpu=use_gpu,
                          max_points_per_centroid=max_points_per_centroid, verbose=False)
    kmeans.train(sample)
    centroids = np.asarray(kmeans.centroids, dtype=np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    objective = [float(x) for x in getattr(kmeans, "obj", [])]
    return KMeansResult(centroids, len(rows), objective, use_gpu)


def assign(points: np.ndarray, centroids: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, inner product with its centroid) for every point; ties go to the lower cluster id."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    clusters = np.empty(len(points), dtype=np.int64)
    similarity = np.empty(len(points), dtype=np.float32)
    for start in range(0, len(points), batch):
        chunk = np.ascontiguousarray(np.asarray(points[start:start + batch], dtype=np.float32))
        sims, ids = index.search(chunk, 1)
        clusters[start:start + len(chunk)] = ids[:, 0]
        similarity[start:start + len(chunk)] = sims[:, 0]
    return clusters, similarity
