"""Selection stage: score the filtered pool with the final model, cluster it in the relationship space, select
greedily inside each cluster (Group-MATES), the baselines at the same budget, and the selected corpora with
per-document lineage."""

import hashlib
import io
import json
import time

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zstandard

from groupmates_assets.defs.common import PartitionResult, finite, materialize_partitions, shard_batches, shard_keys
from groupmates_assets.defs.deployment import STEP_RETRY, gpu_asset_args, on_leased_gpu
from groupmates_assets.defs.partitions import pool_shards, selection_range_keys, selection_ranges
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import clustering, layout, lm, plots
from groupmates_assets.lib import selection as sel
from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.shards import validate_shard_key
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import SelectionProfile

METHODS = ("group_mates", "random", "mates", "fasttext")


def text_hash(text: str) -> str:
    """The same digest the doc_id carries (lib.shards.make_doc_id): checks that a join found the right text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def models_fingerprint(storage: Storage) -> str:
    return layout.fingerprint(final=layout.current_model(storage, "final")["fingerprint"],
                              individual=layout.current_model(storage, "individual")["fingerprint"])


def predictions_path(storage: Storage, key: str) -> str:
    return f"{layout.PREDICTIONS_DIR}/{models_fingerprint(storage)}/{key}.parquet"


def alpha_tau(storage: Storage, settings: SelectionProfile) -> tuple[float, float]:
    """The final model's learned alpha and tau, or the reference code's hard-coded 1 and 1."""
    if not settings.learned_alpha_tau:
        return 1.0, 1.0
    final = layout.current_model(storage, "final")
    return float(final["alpha"]), float(final["tau"])


def selection_fingerprint(storage: Storage, settings: SelectionProfile) -> str:
    alpha, tau = alpha_tau(storage, settings)
    return layout.fingerprint(clusters=layout.current_clusters(storage)["fingerprint"], ratio=settings.ratio,
                              rounding=settings.budget_rounding, alpha=alpha, tau=tau)


# ---------------------------------------------------------------------------------------------- predictions


def _load_predictor(storage: Storage, kind: str) -> tuple[torch.nn.Module, object]:
    """The saved model of ``kind`` and its tokenizer, loaded once per run and used for all its shards."""
    with im.local_model_dir(storage, layout.current_model(storage, kind)["path"]) as local:
        return im.load_model(local, lm.default_device()), im.load_tokenizer(local)


def _predict(predictor: tuple[torch.nn.Module, object], kind: str, texts: list[str], batch_docs: int, log,
             chunked: dict[tuple, enc.ChunkedDocuments]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, u) of every text. ``chunked`` caches the encoder inputs by tokenizer and chunking, so two models that
    share them (final and individual, as trained here) tokenize the shard once."""
    model, tokenizer = predictor
    key = (tokenizer.to_str(), model.config.chunk_len, model.config.chunks)
    if key not in chunked:
        chunked[key] = enc.chunk_documents(tokenizer, texts, model.config.chunk_len, model.config.chunks)
    return im.embed_documents(model, chunked[key], batch_docs, max_tokens=model.config.chunk_len * batch_docs,
                              log=lambda line: log(f"{layout.ASSET_OF_KIND[kind]}: {line}"))


@dg.asset(
    partitions_def=pool_shards,
    group_name="selection",
    code_version="pool-predictions-v1",
    deps=["filtered_pool_shard", "influence_model_final", "individual_influence_model"],
    kinds={"pytorch", "parquet"},
    description="Every filtered document of a shard scored by the final relational model (embedding h in "
    "float16, individual influence u) and by the MATES individual model (u_individual); only the chunks that "
    "hold text are computed, documents batched by length. The models are loaded once per run.",
    **gpu_asset_args(backfill_policy=shard_batches()),
)
@on_leased_gpu
def pool_predictions(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    shard_keys(context)
    storage, settings = platform.storage(), platform.settings().selection
    torch.set_num_threads(settings.torch_threads)
    predictors = {kind: _load_predictor(storage, kind) for kind in ("final", "individual")}
    fingerprint_now = models_fingerprint(storage)
    return materialize_partitions(context, lambda key: predict_shard(context, storage, settings, predictors,
                                                                     fingerprint_now, key))


def predict_shard(context: dg.AssetExecutionContext, storage: Storage, settings: SelectionProfile,
                  predictors: dict[str, tuple], models_fingerprint_now: str, key: str) -> PartitionResult:
    key = validate_shard_key(key)
    kept = storage.read_parquet(f"{layout.FILTERED_DIR.format(key=key)}/kept.parquet", columns=["doc_id", "text"])
    texts = kept.column("text").to_pylist()
    started = time.perf_counter()
    chunked: dict[tuple, enc.ChunkedDocuments] = {}
    h, u = _predict(predictors["final"], "final", texts, settings.predict_batch_docs, context.log.info, chunked)
    _, u_individual = _predict(predictors["individual"], "individual", texts, settings.predict_batch_docs,
                               context.log.info, chunked)
    seconds = time.perf_counter() - started
    dim = h.shape[1]
    table = pa.table({
        "doc_id": kept.column("doc_id"),
        "h": pa.FixedSizeListArray.from_arrays(pa.array(h.numpy().astype(np.float16).reshape(-1)), dim),
        "u": pa.array(u.numpy(), pa.float32()),
        "u_individual": pa.array(u_individual.numpy(), pa.float32()),
        "text_hash": pa.array([text_hash(t) for t in texts], pa.string()),
    })
    info = storage.write_parquet(f"{layout.PREDICTIONS_DIR}/{models_fingerprint_now}/{key}.parquet", table)
    return PartitionResult(
        metadata={
            "dagster/row_count": table.num_rows, "documents": table.num_rows, "dim": dim,
            "documents_per_second": round(table.num_rows / seconds, 1) if seconds and table.num_rows else None,
            "seconds": round(seconds, 1), "device": str(lm.default_device()),
            "u_mean": finite(float(u.mean())) if len(u) else None,
            "u_individual_mean": finite(float(u_individual.mean())) if len(u) else None,
            "models_fingerprint": models_fingerprint_now, "sha256": info.sha256,
            "path": dg.MetadataValue.path(info.path),
        },
        data_version=info.sha256[:16],
    )


def read_predictions(storage: Storage, keys: list[str], columns: list[str]) -> dict[str, pa.Table]:
    paths = {key: predictions_path(storage, key) for key in keys}
    layout.require_files(storage, paths, "pool_predictions")
    return {key: storage.read_parquet(path, columns=columns) for key, path in paths.items()}


def embeddings(table: pa.Table) -> np.ndarray:
    column = table.column("h").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


# ----------------------------------------------------------------------------------------------- clustering


@dg.asset(
    group_name="selection",
    code_version="cluster-centroids-v1",
    retry_policy=STEP_RETRY,
    deps=[dg.AssetDep(pool_predictions, partition_mapping=dg.AllPartitionMapping()), "filtered_pool_summary"],
    kinds={"faiss", "numpy"},
    description="Influence-aware clusters: spherical k-means (faiss) on the final model's embeddings h, trained "
    "on a seeded sample of max_points_per_centroid x k points; k from the target mean cluster size.",
)
def cluster_centroids(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    storage, settings = platform.storage(), platform.settings(alone=True).selection
    keys = layout.filtered_shards(storage)
    paths = {key: predictions_path(storage, key) for key in keys}
    layout.require_files(storage, paths, "pool_predictions")
    counts = {key: storage.read_parquet(path, columns=["u"]).num_rows for key, path in paths.items()}
    total = sum(counts.values())
    k = sel.clusters_for(total, settings.mean_cluster_size)
    sample = sample_embeddings(storage, paths, counts, settings.max_points_per_centroid * k, settings.kmeans_seed)
    context.log.info(f"spherical k-means: {total:,} documents into {k:,} clusters, trained on {len(sample):,} "
                     f"sampled embeddings of {sample.shape[1]} dimensions")
    started = time.perf_counter()
    result = clustering.train_spherical_kmeans(sample, k, settings.kmeans_iterations, settings.kmeans_seed,
                                               settings.max_points_per_centroid, threads=settings.torch_threads)
    train_seconds = time.perf_counter() - started
    sample_clusters, _ = clustering.assign(sample, result.centroids)
    sizes = np.bincount(sample_clusters, minlength=k) * (total / max(len(sample), 1))  # estimated from the sample
    cluster_fp = layout.fingerprint(models=models_fingerprint(storage), shards=keys, k=k,
                                    iterations=settings.kmeans_iterations, seed=settings.kmeans_seed,
                                    mpc=settings.max_points_per_centroid)
    info = storage.write_numpy(f"{layout.CLUSTERS_DIR}/{cluster_fp}/centroids.npy", result.centroids)
    layout.write_pointer(storage, layout.CLUSTERS_DIR, {"fingerprint": cluster_fp, "k": k, "documents": total,
                                                        "centroids_sha256": info.sha256})
    return dg.MaterializeResult(
        metadata={
            "clusters": k, "documents": total, "sample_size": result.sample_size,
            "iterations": settings.kmeans_iterations, "seed": settings.kmeans_seed, "gpu": result.gpu,
            "train_seconds": round(train_seconds, 2),
            "estimated_empty_clusters": int((sizes == 0).sum()),
            "estimated_size_median": float(np.median(sizes)), "estimated_size_max": float(sizes.max()),
            "size_histogram": dg.MetadataValue.md(_size_histogram(sizes, f"{k:,} clusters: sizes (from the sample)")),
            "fingerprint": cluster_fp, "sha256": info.sha256, "path": dg.MetadataValue.path(info.path),
        },
        data_version=dg.DataVersion(info.sha256[:16]),
    )


def sample_embeddings(storage: Storage, paths: dict[str, str], counts: dict[str, int], budget: int,
                      seed: int) -> np.ndarray:
    """A seeded uniform sample of at most ``budget`` embeddings over all shards, read shard by shard, so memory
    holds one shard and the sample, never the whole pool."""
    total = sum(counts.values())
    rows = np.sort(np.random.default_rng(seed).choice(total, size=budget, replace=False)) if total > budget \
        else np.arange(total)
    parts, offset = [], 0
    for key, path in paths.items():
        mine = rows[(rows >= offset) & (rows < offset + counts[key])] - offset
        if len(mine):
            parts.append(embeddings(storage.read_parquet(path, columns=["h"]).take(pa.array(mine))))
        offset += counts[key]
    if not parts:
        raise ValueError("no documents to cluster: every shard of the filtered pool is empty")
    return np.concatenate(parts)


def _size_histogram(sizes: np.ndarray, title: str) -> str:
    edges = np.unique(np.linspace(0, max(float(sizes.max()), 1.0) + 1, 31).round()).tolist()
    png = plots.histogram_png(edges, np.histogram(sizes, bins=edges)[0].tolist(), title,
                              "documents in the cluster", ylabel="clusters")
    return plots.png_markdown(png, "cluster sizes")


def assignments_path(storage: Storage, key: str) -> str:
    return f"{layout.CLUSTERS_DIR}/{layout.current_clusters(storage)['fingerprint']}/assignments/{key}.parquet"


@dg.asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="selection",
    code_version="cluster-assignments-v1",
    retry_policy=STEP_RETRY,
    deps=[cluster_centroids, pool_predictions],
    kinds={"faiss", "parquet"},
    description="Each document of a shard assigned to its nearest centroid (largest inner product with the "
    "unit-norm centroids): doc_id, cluster, similarity.",
)
def cluster_assignments(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    shard_keys(context)
    storage = platform.storage()
    current = layout.current_clusters(storage)
    centroids = np.asarray(storage.read_numpy(f"{layout.CLUSTERS_DIR}/{current['fingerprint']}/centroids.npy"))
    return materialize_partitions(context, lambda key: assign_shard(storage, current, centroids, key))


def assign_shard(storage: Storage, current: dict, centroids: np.ndarray, key: str) -> PartitionResult:
    key = validate_shard_key(key)
    table = read_predictions(storage, [key], ["doc_id", "h"])[key]
    clusters, similarity = clustering.assign(embeddings(table), centroids) if table.num_rows else (
        np.zeros(0, np.int64), np.zeros(0, np.float32))
    out = pa.table({"doc_id": table.column("doc_id"), "cluster": pa.array(clusters, pa.int64()),
                    "similarity": pa.array(similarity, pa.float32())})
    info = storage.write_parquet(f"{layout.CLUSTERS_DIR}/{current['fingerprint']}/assignments/{key}.parquet", out)
    return PartitionResult(
        metadata={"dagster/row_count": out.num_rows, "documents": out.num_rows,
                  "clusters_touched": len(np.unique(clusters)),
                  "mean_similarity": finite(float(similarity.mean())) if len(similarity) else None,
                  "clusters_fingerprint": current["fingerprint"], "path": dg.MetadataValue.path(info.path)},
        data_version=info.sha256[:16],
    )


def read_assignments(storage: Storage, keys: list[str]) -> dict[str, pa.Table]:
    paths = {key: assignments_path(storage, key) for key in keys}
    layout.require_files(storage, paths, "cluster_assignments")
    return {key: storage.read_parquet(path) for key, path in paths.items()}


def cluster_sizes(assignments: dict[str, pa.Table], k: int) -> np.ndarray:
    return np.sum([np.bincount(t.column("cluster").to_numpy(), minlength=k) for t in assignments.values()],
                  axis=0) if assignments else np.zeros(k, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ selection


def range_bounds(range_key: str, k: int) -> tuple[int, int]:
    """Cluster ids [start, stop) of a range partition ``clusters-III-of-NNN``."""
    parts = range_key.split("-")
    if len(parts) != 4 or parts[0] != "clusters" or parts[2] != "of" or not all(
            p.isascii() and p.isdigit() for p in (parts[1], parts[3])):
        raise ValueError(f"not a cluster range key: {range_key!r}")
    index, ranges = int(parts[1]), int(parts[3])
    return index * k // ranges, (index + 1) * k // ranges


@dg.asset(
    partitions_def=selection_ranges,
    group_name="selection",
    code_version="group-mates-selection-v1",
    retry_policy=STEP_RETRY,
    deps=[dg.AssetDep(cluster_assignments, partition_mapping=dg.AllPartitionMapping())],
    kinds={"pytorch", "parquet"},
    check_specs=[
        dg.AssetCheckSpec("budgets_exact", asset="selected_documents", blocking=True,
                          description="T12: every cluster holds exactly its budget, no duplicates, all ids valid"),
        dg.AssetCheckSpec("quality_signal", asset="selected_documents",
                          description="T16: mean u of the selected documents is below the pool's (a warning: it "
                          "fails when u barely varies inside clusters, i.e. a weak model, or an inverted sign)"),
    ],
    description="Group-MATES: inside every cluster of this range, greedily the candidate with the most "
    "beneficial predicted influence given what the cluster already selected (closed form with the learned alpha "
    "and tau), up to floor/ceil(r x |C|) documents. Rows: doc_id, shard, cluster, rank, u, predicted influence.",
)
def selected_documents(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    storage, settings = platform.storage(), platform.settings().selection
    current, keys = layout.current_clusters(storage), layout.filtered_shards(storage)
    start, stop = range_bounds(context.partition_key, current["k"])
    assignments = read_assignments(storage, keys)
    sizes = cluster_sizes(assignments, current["k"])
    budgets = sel.cluster_budgets(sizes, settings.ratio, settings.budget_rounding)
    predictions = read_predictions(storage, keys, ["doc_id", "h", "u"])
    doc_ids, shards, clusters, hs, us = [], [], [], [], []
    for key in keys:
        table = assignments[key]
        mask = pc.and_(pc.greater_equal(table.column("cluster"), start), pc.less(table.column("cluster"), stop))
        chosen = table.filter(mask)
        if chosen.num_rows == 0:
            continue
        pred = predictions[key]
        rows = pc.index_in(chosen.column("doc_id"), value_set=pred.column("doc_id"))
        if rows.null_count:
            raise ValueError(f"shard {key}: {rows.null_count} assigned documents have no prediction; rematerialize "
                             "pool_predictions and cluster_assignments for it")
        picked = pred.take(rows)
        doc_ids += chosen.column("doc_id").to_pylist()
        shards += [key] * chosen.num_rows
        clusters.append(chosen.column("cluster").to_numpy())
        hs.append(embeddings(picked))
        us.append(picked.column("u").to_numpy())
    alpha, tau = alpha_tau(storage, settings)
    started = time.perf_counter()
    if doc_ids:
        order = np.argsort(np.array(doc_ids, dtype=object), kind="stable")  # cluster order by doc_id, not input
        cluster_arr, h, u = np.concatenate(clusters)[order], np.concatenate(hs)[order], np.concatenate(us)[order]
        doc_arr, shard_arr = np.array(doc_ids, dtype=object)[order], np.array(shards, dtype=object)[order]
        result = sel.select_in_clusters(h, u, cluster_arr, budgets, alpha, tau, device=lm.default_device())
    else:
        cluster_arr, u = np.zeros(0, np.int64), np.zeros(0)
        doc_arr, shard_arr = np.zeros(0, object), np.zeros(0, object)
        result = sel.select_in_clusters(np.zeros((0, 1)), np.zeros(0), cluster_arr, budgets, alpha, tau)
    seconds = time.perf_counter() - started
    out = pa.table({
        "doc_id": pa.array(doc_arr[result.rows].tolist(), pa.string()),
        "shard": pa.array(shard_arr[result.rows].tolist(), pa.string()),
        "cluster": pa.array(result.cluster, pa.int64()), "rank": pa.array(result.rank, pa.int64()),
        "u": pa.array(u[result.rows], pa.float32()), "predicted": pa.array(result.predicted, pa.float32()),
    })
    fp = selection_fingerprint(storage, settings)
    path = f"{layout.SELECTIONS_DIR}/group_mates/{fp}/{context.partition_key}.parquet"
    info = storage.write_parquet(path, out)
    per_cluster = np.bincount(result.cluster - start, minlength=stop - start) if stop > start else np.zeros(0)
    expected = budgets[start:stop]
    duplicates = out.num_rows - len(set(out.column("doc_id").to_pylist()))
    budget_ok = bool(np.array_equal(per_cluster, expected)) and duplicates == 0
    pool_u, picked_u = float(np.mean(u)) if len(u) else 0.0, float(np.mean(u[result.rows])) if len(result) else 0.0
    # How much u varies inside clusters against across the pool: when it barely does (h-clusters also group
    # similar u, and a weak model spreads u little), the greedy is driven by diversity and T16 can fail.
    within_std = float(np.mean([u[cluster_arr == c].std() for c in np.unique(cluster_arr)])) if len(u) else 0.0
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": out.num_rows, "selected": out.num_rows, "candidates": len(doc_arr),
            "clusters": stop - start, "cluster_range": f"[{start}, {stop})", "alpha": alpha, "tau": tau,
            "learned_alpha_tau": settings.learned_alpha_tau, "ratio": settings.ratio,
            "budget_rounding": settings.budget_rounding, "select_seconds": round(seconds, 3),
            "documents_per_second": round(len(doc_arr) / seconds, 1) if seconds and len(doc_arr) else None,
            "mean_u_selected": picked_u, "mean_u_candidates": pool_u, "sha256": info.sha256,
            "cluster_size_histogram": dg.MetadataValue.md(_size_histogram(sizes[start:stop], "cluster sizes"))
            if stop > start else "",
            "path": dg.MetadataValue.path(info.path),
        },
        check_results=[
            dg.AssetCheckResult(check_name="budgets_exact", passed=budget_ok, severity=dg.AssetCheckSeverity.ERROR,
                                metadata={"selected": out.num_rows, "budget": int(expected.sum()),
                                          "clusters_off_budget": int((per_cluster != expected).sum()),
                                          "duplicate_ids": duplicates}),
            dg.AssetCheckResult(check_name="quality_signal", passed=bool(len(result) == 0 or picked_u < pool_u),
                                severity=dg.AssetCheckSeverity.WARN,
                                metadata={"mean_u_selected": picked_u, "mean_u_candidates": pool_u,
                                          "u_std_pool": float(np.std(u)) if len(u) else 0.0,
                                          "u_std_within_clusters": within_std}),
        ],
        data_version=dg.DataVersion(info.sha256[:16]),
    )


# ------------------------------------------------------------------------------------------------ baselines


def total_budget(storage: Storage, settings: SelectionProfile, keys: list[str]) -> int:
    """Group-MATES' total selection size: the baselines select exactly as many documents."""
    current = layout.current_clusters(storage)
    sizes = cluster_sizes(read_assignments(storage, keys), current["k"])
    return int(sel.cluster_budgets(sizes, settings.ratio, settings.budget_rounding).sum())


def _baseline(context: dg.AssetExecutionContext, platform: PlatformResource, method: str) -> dg.MaterializeResult:
    storage, settings = platform.storage(), platform.settings().selection
    keys = layout.filtered_shards(storage)
    budget = total_budget(storage, settings, keys)
    if method == "fasttext":
        tables = {k: storage.read_parquet(f"{layout.FILTERED_DIR.format(key=k)}/kept.parquet",
                                          columns=["doc_id", "quality_score"]) for k in keys}
        score_column = "quality_score"
    else:
        tables = read_predictions(storage, keys, ["doc_id", "u_individual"])
        score_column = "u_individual"
    doc_ids = [d for k in keys for d in tables[k].column("doc_id").to_pylist()]
    shard_of = [k for k in keys for _ in range(tables[k].num_rows)]
    scores = np.concatenate([tables[k].column(score_column).to_numpy() for k in keys]) if keys else np.zeros(0)
    order = np.argsort(np.array(doc_ids, dtype=object), kind="stable")  # ties by doc_id, not by input order
    if method == "random":
        rows = order[sel.random_subset(len(order), budget, settings.random_seed)]
    else:
        rows = order[sel.top_k(scores[order], budget, lowest=method == "mates")]
    out = pa.table({"doc_id": [doc_ids[i] for i in rows], "shard": [shard_of[i] for i in rows],
                    "rank": pa.array(np.arange(len(rows)), pa.int64()),
                    "score": pa.array(scores[rows] if method != "random" else np.zeros(len(rows)), pa.float32())})
    fp = layout.fingerprint(selection=selection_fingerprint(storage, settings), method=method,
                            seed=settings.random_seed)
    info = storage.write_parquet(f"{layout.SELECTIONS_DIR}/{method}/{fp}/selected.parquet", out)
    return dg.MaterializeResult(
        metadata={"dagster/row_count": out.num_rows, "selected": out.num_rows, "pool": len(doc_ids),
                  "budget": budget, "score": score_column if method != "random" else "none (seeded uniform)",
                  "mean_score_selected": finite(float(scores[rows].mean())) if len(rows) else None,
                  "mean_score_pool": finite(float(scores.mean())) if len(scores) else None,
                  "sha256": info.sha256, "path": dg.MetadataValue.path(info.path)},
        data_version=dg.DataVersion(info.sha256[:16]),
    )


BASELINE_DEPS = [dg.AssetDep(cluster_assignments, partition_mapping=dg.AllPartitionMapping())]


@dg.asset(group_name="selection", code_version="random-selection-v1", kinds={"parquet"}, retry_policy=STEP_RETRY,
          deps=BASELINE_DEPS, description="Baseline: a seeded uniform sample of the filtered pool, the same number "
          "of documents as Group-MATES selects.")
def selected_random(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _baseline(context, platform, "random")


@dg.asset(group_name="selection", code_version="mates-selection-v1", kinds={"parquet"}, retry_policy=STEP_RETRY,
          deps=[*BASELINE_DEPS, dg.AssetDep(pool_predictions, partition_mapping=dg.AllPartitionMapping())],
          description="Baseline (MATES): the documents with the most beneficial individual influence "
          "(lowest u of the individual model), Group-MATES' budget.")
def selected_mates(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _baseline(context, platform, "mates")


@dg.asset(group_name="selection", code_version="fasttext-selection-v1", kinds={"parquet"}, retry_policy=STEP_RETRY,
          deps=BASELINE_DEPS, description="Baseline: the documents with the highest fastText quality score, "
          "Group-MATES' budget.")
def selected_fasttext(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _baseline(context, platform, "fasttext")


# ------------------------------------------------------------------------------------------- selected corpus


def selection_tables(storage: Storage, settings: SelectionProfile, ranges: int) -> dict[str, pa.Table]:
    """The current selection of every method (Group-MATES: all cluster ranges), each with a doc_id column."""
    fp = selection_fingerprint(storage, settings)
    paths = {r: f"{layout.SELECTIONS_DIR}/group_mates/{fp}/{r}.parquet" for r in selection_range_keys(ranges)}
    layout.require_files(storage, paths, "selected_documents")
    out = {"group_mates": pa.concat_tables([storage.read_parquet(p) for p in paths.values()])}
    for method in METHODS[1:]:
        path = (f"{layout.SELECTIONS_DIR}/{method}/"
                f"{layout.fingerprint(selection=fp, method=method, seed=settings.random_seed)}/selected.parquet")
        if not storage.exists(path):
            raise FileNotFoundError(f"no current selection for {method}; materialize selected_{method} first")
        out[method] = storage.read_parquet(path)
    return out


def lineage(context: dg.AssetExecutionContext, storage: Storage) -> dict:
    """Which inputs produced the selection: hashes, fingerprints and the runs that materialized them."""
    runs = {}
    for name in ("quality_classifier", "probe_checkpoint", "influence_model_final", "individual_influence_model",
                 "cluster_centroids"):
        event = context.instance.get_latest_materialization_event(dg.AssetKey(name))
        runs[name] = event.run_id if event else None
    oracle = layout.oracle_pointers(storage)
    final = layout.current_model(storage, "final")
    return {
        "classifier": layout.current_classifier(storage),
        "probe_checkpoint_sha256": next(iter(oracle.values()), {}).get("checkpoint_sha256"),
        "oracle_fingerprints": {d: o["fingerprint"] for d, o in oracle.items()},
        "influence_model_final": {k: final[k] for k in ("fingerprint", "path", "alpha", "tau")},
        "influence_model_individual": layout.current_model(storage, "individual")["fingerprint"],
        "clusters": layout.current_clusters(storage), "runs": runs,
    }


@dg.asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="selection",
    code_version="selected-corpus-v1",
    retry_policy=STEP_RETRY,
    deps=["filtered_pool_shard", dg.AssetDep(selected_documents, partition_mapping=dg.AllPartitionMapping()),
          selected_random, selected_mates, selected_fasttext],
    kinds={"parquet", "json"},
    check_specs=[dg.AssetCheckSpec(
        "index_round_trip", asset="selected_corpus", blocking=True,
        description="T17: every selected id of this shard was found by doc_id, and the text written hashes to the "
        "text that was embedded",
    )],
    description="The selected documents of a shard for every method, as DCLM-format JSON lines (zstd): the "
    "original record plus doc_id and the selection fields; joined with the filtered pool by doc_id.",
)
def selected_corpus(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    shard_keys(context)
    storage, settings = platform.storage(), platform.settings().selection
    tables = selection_tables(storage, settings, settings.cluster_ranges)
    provenance = finite(lineage(context, storage))
    return materialize_partitions(context, lambda key: write_corpus_shard(storage, settings, tables, provenance, key),
                                  check_name="index_round_trip")


def write_corpus_shard(storage: Storage, settings: SelectionProfile, tables: dict[str, pa.Table], provenance: dict,
                       key: str) -> PartitionResult:
    """The shard's selected documents of every method as JSON lines, joined by doc_id; the stats file goes last."""
    key = validate_shard_key(key)
    kept = storage.read_parquet(f"{layout.FILTERED_DIR.format(key=key)}/kept.parquet")
    embedded = read_predictions(storage, [key], ["doc_id", "text_hash"])[key]
    embedded_hash = dict(zip(embedded.column("doc_id").to_pylist(), embedded.column("text_hash").to_pylist(),
                             strict=True))
    counts, missing, mismatched, files = {}, 0, 0, {}
    for method, table in tables.items():
        mine = table.filter(pc.equal(table.column("shard"), key))
        rows = pc.index_in(mine.column("doc_id"), value_set=kept.column("doc_id"))
        missing += rows.null_count
        found = kept.take(pc.drop_null(rows))
        selection_fields = mine.filter(pc.is_valid(rows)).drop_columns(["doc_id", "shard"]).to_pylist()
        buffer = io.BytesIO()
        with zstandard.ZstdCompressor(level=3).stream_writer(buffer, closefd=False) as out:
            for record, extra in zip(found.to_pylist(), selection_fields, strict=True):
                if text_hash(record["text"]) != embedded_hash.get(record["doc_id"]) or not record["doc_id"].endswith(
                        text_hash(record["text"])):
                    mismatched += 1
                line = {**json.loads(record["fields"] or "{}"), "text": record["text"], "doc_id": record["doc_id"],
                        "selection": {"method": method, **finite(extra)}}
                out.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        info = storage.write_bytes(f"{layout.SELECTED_CORPUS_DIR}/{method}/{key}.jsonl.zst", buffer.getvalue())
        counts[method], files[method] = found.num_rows, info.sha256
    passed = missing == 0 and mismatched == 0
    storage.write_json(f"{layout.SELECTED_CORPUS_DIR}/_stats/{key}.json", {  # completion marker, written last
        "shard": key, "kept": kept.num_rows, "selected": counts, "sha256": files, "ids_not_found": missing,
        "text_hash_mismatches": mismatched})
    table_md = "| method | selected | share of kept |\n|---|---|---|\n" + "\n".join(
        f"| {m} | {c:,} | {c / max(kept.num_rows, 1):.3f} |" for m, c in counts.items())
    return PartitionResult(
        metadata={
            "dagster/row_count": counts.get("group_mates", 0), "kept_documents": kept.num_rows,
            **{f"selected_{m}": c for m, c in counts.items()}, "by_method": dg.MetadataValue.md(table_md),
            "lineage": dg.MetadataValue.json(provenance),
            "selection_settings": dg.MetadataValue.json({k: getattr(settings, k) for k in (
                "ratio", "budget_rounding", "learned_alpha_tau", "mean_cluster_size", "kmeans_iterations",
                "kmeans_seed", "random_seed")}),
            "sha256": dg.MetadataValue.json(files),
            "path": dg.MetadataValue.path(storage.url(layout.SELECTED_CORPUS_DIR)),
        },
        check_passed=passed, check_metadata={"ids_not_found": missing, "text_hash_mismatches": mismatched},
    )
