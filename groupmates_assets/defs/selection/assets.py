"""Selection stage: score the filtered pool with the final model, cluster it in the relationship space, select
greedily inside each cluster (Group-MATES), the baselines at the same budget, and the selected corpora with
per-document lineage."""

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import dagster as dg
import numpy as np
import pyarrow as pa
import torch

from groupmates_assets.defs.common import (
    PartitionResult,
    blocking_check,
    materialize_partitions,
    shard_batches,
    shard_keys,
)
from groupmates_assets.defs.deployment import gpu_asset, step_asset
from groupmates_assets.defs.partitions import pool_shards, selection_range_keys, selection_ranges
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import budgets as budgets_lib
from groupmates_assets.lib import clustering, composition, layout, lm, plots
from groupmates_assets.lib import corpus as corpus_lib
from groupmates_assets.lib import selection as sel
from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.jsonsafe import finite
from groupmates_assets.lib.shards import text_hash, validate_shard_key
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import SelectionProfile


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


def range_selection_dir(selection_fp: str, range_key: str) -> str:
    """Group-MATES' selection of one range of clusters (``selection_fp``: :func:`selection_fingerprint`): one file
    per shard of the filtered pool under it, and the range's summary ``<dir>.json``, written last."""
    return f"{layout.SELECTIONS_DIR}/group_mates/{selection_fp}/{range_key}"


def sequences_dir(selection_fp: str, settings: SelectionProfile) -> str:
    """Every cluster's greedy sequence up to its cap (``<range>.parquet``) and one row per cluster
    (``<range>.clusters.parquet``), written by ``selected_documents`` for the budget policies."""
    fingerprint = layout.fingerprint(selection=selection_fp, cap=settings.policy_limits().cap)
    return f"{layout.SELECTIONS_DIR}/sequences/{fingerprint}"


def policy_path(selection_fp: str, method: sel.SelectionMethod, settings: SelectionProfile) -> str:
    """A budget policy's selection (one file per shard under ``shards/``, the summary ``selected.json`` written
    last, and ``budgets.parquet``), versioned by Group-MATES' selection
    and the policy's limits."""
    limits = settings.policy_limits()
    parts = {"sharpness": limits.sharpness} if method.policy == budgets_lib.WEIGHTED else {}
    fingerprint = layout.fingerprint(selection=selection_fp, method=method.name, policy=method.policy,
                                     floor=limits.floor, cap=limits.cap, **parts)
    return f"{layout.SELECTIONS_DIR}/{method.name}/{fingerprint}"


def baseline_temperature(method: sel.SelectionMethod, settings: SelectionProfile) -> float:
    """The baseline's Gumbel-top-k temperature from the profile (MATES: ``selection.mates_temperature``); 0, the
    deterministic top-k, for a method without one."""
    return float(getattr(settings, method.temperature_setting)) if method.temperature_setting else 0.0


def baseline_dir(selection_fp: str, method: str, seed: int, temperature: float = 0.0) -> str:
    """A baseline's selection, versioned by Group-MATES' (whose budget it takes), its seed and, when it samples,
    its Gumbel-top-k temperature and the draws (per-doc_id uniforms, :func:`sel.doc_uniforms`): one file per shard
    under ``<dir>/shards/`` and the summary ``<dir>/selected.json``, written last."""
    sampling = {"temperature": temperature} if temperature else {}
    if sel.SELECTION_METHODS[method].draws_noise(temperature):
        sampling["draws"] = "blake2b-doc-id"
    fingerprint = layout.fingerprint(selection=selection_fp, method=method, seed=seed, **sampling)
    return f"{layout.SELECTIONS_DIR}/{method}/{fingerprint}"


def write_by_shard(storage: Storage, directory: str, marker: str, table: pa.Table, keys: list[str],
                   summary: dict) -> str:
    """A selection as one file per shard of ``keys`` (empty ones too, so a reader can tell "none of this shard"
    from "not written"), then ``marker``, the summary that says the set is complete. Returns a digest of the
    shards' files, in shard order."""
    digest = hashlib.sha256()
    for key, rows in sel.split_by_shard(table, keys).items():
        digest.update(storage.write_parquet(f"{directory}/{key}.parquet", rows).sha256.encode())
    storage.write_json(marker, {**summary, "selected": table.num_rows, "shards": len(keys),
                                "sha256": digest.hexdigest()})
    return digest.hexdigest()


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


@gpu_asset(
    backfill_policy=shard_batches(),
    partitions_def=pool_shards,
    group_name="selection",
    code_version="pool-predictions-v1",
    deps=["filtered_pool_shard", "influence_model_final", "individual_influence_model"],
    kinds={"pytorch", "parquet"},
)
def pool_predictions(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Every filtered document of a shard scored by the final relational model (embedding h in float16, individual
    influence u) and by the MATES individual model (u_individual); only the chunks that hold text are computed,
    documents batched by length. The models are loaded once per run."""
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


# ----------------------------------------------------------------------------------------------- clustering


@step_asset(
    group_name="selection",
    code_version="cluster-centroids-v1",
    deps=[dg.AssetDep(pool_predictions, partition_mapping=dg.AllPartitionMapping()), "filtered_pool_summary"],
    kinds={"faiss", "numpy"},
)
def cluster_centroids(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Influence-aware clusters: spherical k-means (faiss) on the final model's embeddings h, trained on a seeded sample
    of max_points_per_centroid x k points; k from the target mean cluster size."""
    storage, settings = platform.storage(), platform.settings(alone=True).selection
    keys = layout.filtered_shards(storage)
    paths = {key: predictions_path(storage, key) for key in keys}
    layout.require_files(storage, paths, "pool_predictions")
    counts = {key: storage.parquet_rows(path) for key, path in paths.items()}  # footers only
    total = sum(counts.values())
    k = sel.clusters_for(total, settings.mean_cluster_size)
    sample = sel.sample_embeddings(storage, paths, counts, settings.max_points_per_centroid * k, settings.kmeans_seed)
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


def _size_histogram(sizes: np.ndarray, title: str) -> str:
    edges = np.unique(np.linspace(0, max(float(sizes.max()), 1.0) + 1, 31).round()).tolist()
    png = plots.histogram_png(edges, np.histogram(sizes, bins=edges)[0].tolist(), title,
                              "documents in the cluster", ylabel="clusters")
    return plots.png_markdown(png, "cluster sizes")


# The sorted cluster ids run-length encode to a few bytes per cluster; the float16 embeddings, random-looking to a
# dictionary, go byte-stream-split (their exponent bytes compress): a third of the time to write and to read.
ASSIGNMENTS_ENCODING = {"use_dictionary": ["cluster"], "column_encoding": {"h.list.element": "BYTE_STREAM_SPLIT"}}


def assignments_dir(storage: Storage) -> str:
    """The current clusters' assignments: one file per shard, sorted by cluster (``sorted_assignments``; the
    unsorted ``assignments`` folder of the earlier layout is never read)."""
    return f"{layout.CLUSTERS_DIR}/{layout.current_clusters(storage)['fingerprint']}/sorted_assignments"


def assignments_path(storage: Storage, key: str) -> str:
    return f"{assignments_dir(storage)}/{key}.parquet"


@step_asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="selection",
    code_version="cluster-assignments-v2",
    deps=[cluster_centroids, pool_predictions],
    kinds={"faiss", "parquet"},
)
def cluster_assignments(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Each document of a shard assigned to its nearest centroid (largest inner product with the unit-norm centroids):
    doc_id, cluster, similarity, and its h and u, sorted by cluster with one row group per cluster range, so a
    `selected_documents` partition reads only its own clusters' rows of every shard."""
    shard_keys(context)
    storage, settings = platform.storage(), platform.settings().selection
    current = layout.current_clusters(storage)
    centroids = np.asarray(storage.read_numpy(f"{layout.CLUSTERS_DIR}/{current['fingerprint']}/centroids.npy",
                                              cache=True))  # every assignment run reads them
    bounds = sel.all_range_bounds(current["k"], settings.cluster_ranges)
    return materialize_partitions(context, lambda key: assign_shard(storage, current, centroids, bounds, key))


def assign_shard(storage: Storage, current: dict, centroids: np.ndarray, bounds: list[tuple[int, int]],
                 key: str) -> PartitionResult:
    """``bounds``: the cluster ranges (:func:`sel.all_range_bounds`) the file's row groups are cut at."""
    key = validate_shard_key(key)
    table = read_predictions(storage, [key], ["doc_id", "h", "u"])[key]
    clusters, similarity = clustering.assign(sel.embeddings(table), centroids) if table.num_rows else (
        np.zeros(0, np.int64), np.zeros(0, np.float32))
    out = sel.sorted_by_cluster(pa.table({
        "doc_id": table.column("doc_id"), "cluster": pa.array(clusters, pa.int64()),
        "similarity": pa.array(similarity, pa.float32()), "h": table.column("h"), "u": table.column("u")}))
    groups = sel.range_row_groups(out.column("cluster").to_numpy(), bounds)
    info = storage.write_parquet(f"{layout.CLUSTERS_DIR}/{current['fingerprint']}/sorted_assignments/{key}.parquet",
                                 out, row_group_sizes=groups, **ASSIGNMENTS_ENCODING)
    return PartitionResult(
        metadata={"dagster/row_count": out.num_rows, "documents": out.num_rows,
                  "clusters_touched": len(np.unique(clusters)), "row_groups": len(groups),
                  "mean_similarity": finite(float(similarity.mean())) if len(similarity) else None,
                  "clusters_fingerprint": current["fingerprint"], "bytes": info.bytes,
                  "path": dg.MetadataValue.path(info.path)},
        data_version=info.sha256[:16],
    )


def iter_assignments(storage: Storage, keys: list[str], columns: list[str] | None = None,
                     clusters: tuple[int, int] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(shard, its assignments) one shard at a time; with ``clusters`` = [start, stop) only the rows of those
    clusters, read from their row groups alone."""
    directory = assignments_dir(storage)
    paths = {key: f"{directory}/{key}.parquet" for key in keys}
    layout.require_files(storage, paths, "cluster_assignments")
    for key, path in paths.items():
        if clusters is None:
            yield key, storage.read_parquet(path, columns=columns)
        else:
            yield key, storage.read_parquet_where(path, "cluster", clusters[0], clusters[1] - 1, columns=columns)


def read_assignments(storage: Storage, keys: list[str], columns: list[str] | None = None,
                     clusters: tuple[int, int] | None = None) -> dict[str, pa.Table]:
    """Every shard's assignments at once (see :func:`iter_assignments`)."""
    return dict(iter_assignments(storage, keys, columns, clusters))


def read_cluster_sizes(storage: Storage, keys: list[str], k: int) -> np.ndarray:
    """Documents per cluster over the whole pool from the ``cluster`` column alone, one shard at a time (sorted,
    the column compresses to a few bytes per cluster)."""
    return sel.cluster_sizes((table for _, table in iter_assignments(storage, keys, ["cluster"])), k)


# ------------------------------------------------------------------------------------------------ selection


@step_asset(
    partitions_def=selection_ranges,
    group_name="selection",
    code_version="group-mates-selection-v2",
    deps=[dg.AssetDep(cluster_assignments, partition_mapping=dg.AllPartitionMapping())],
    kinds={"pytorch", "parquet"},
    check_specs=[
        dg.AssetCheckSpec("budgets_exact", asset="selected_documents", blocking=True,
                          description="T12: every cluster holds exactly its budget, no duplicates, all ids valid"),
        dg.AssetCheckSpec("quality_signal", asset="selected_documents",
                          description="T16: mean u of the selected documents is below the pool's (a warning: it "
                          "fails when u barely varies inside clusters, i.e. a weak model, or an inverted sign)"),
    ],
)
def selected_documents(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Group-MATES: inside every cluster of this range, greedily the candidate with the most beneficial predicted
    influence given what the cluster already selected (closed form with the learned alpha and tau), up to
    floor/ceil(r x |C|) documents. Reads only this range's rows of every shard's assignments (their h and u
    included), so its memory follows the range, not the pool. Rows: doc_id, shard, cluster, rank, u, predicted
    influence; one file per shard. Each cluster's sequence is computed up to its cap (selection.budget_cap) and kept,
    with one row per cluster, for the budget policies (selected_weighted, selected_global); the uniform selection is
    its prefix."""
    storage, settings = platform.storage(), platform.settings().selection
    selected = select_range(storage, settings, context.partition_key)
    checks, out, candidates = selected.checks, selected.table, selected.candidates
    start, stop, sizes = selected.start, selected.stop, selected.sizes
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": out.num_rows, "selected": out.num_rows, "candidates": len(candidates),
            "clusters": stop - start, "cluster_range": f"[{start}, {stop})", "alpha": selected.alpha,
            "tau": selected.tau, "learned_alpha_tau": settings.learned_alpha_tau, "ratio": settings.ratio,
            "budget_rounding": settings.budget_rounding, "select_seconds": round(selected.seconds, 3),
            "sequence_rows": selected.sequence_rows, "budget_cap": settings.policy_limits().cap,
            "documents_per_second": round(len(candidates) / selected.seconds, 1)
            if selected.seconds and len(candidates) else None,
            "mean_u_selected": checks.mean_u_selected, "mean_u_candidates": checks.mean_u_candidates,
            "sha256": selected.sha256,
            "cluster_size_histogram": dg.MetadataValue.md(_size_histogram(sizes[start:stop], "cluster sizes"))
            if stop > start else "",
            "path": dg.MetadataValue.path(storage.url(selected.directory)),
        },
        check_results=_range_check_results(checks, out.num_rows),
        data_version=dg.DataVersion(selected.sha256[:16]),
    )


@dataclass(frozen=True)
class RangeSelection:
    """What one range partition selected, and what its checks and metadata need."""

    start: int
    stop: int
    candidates: sel.Candidates
    sizes: np.ndarray  # documents per cluster id (the range's clusters; 0 elsewhere)
    table: pa.Table
    checks: sel.RangeChecks
    alpha: float
    tau: float
    seconds: float
    directory: str
    sha256: str
    sequence_rows: int  # rows of the range's greedy sequences (up to each cluster's cap)


def select_range(storage: Storage, settings: SelectionProfile, range_key: str) -> RangeSelection:
    """Group-MATES over the clusters of ``range_key`` (any ``clusters-III-of-NNN``): their rows of every shard,
    their budgets from their own sizes, the greedy, and the selection written one file per shard."""
    current, keys = layout.current_clusters(storage), layout.filtered_shards(storage)
    start, stop = sel.range_bounds(range_key, current["k"])
    assignments = read_assignments(storage, keys, ["doc_id", "cluster", "h", "u"], clusters=(start, stop))
    sizes = sel.cluster_sizes(assignments.values(), current["k"])  # exact for this range's clusters
    budgets = sel.cluster_budgets(sizes, settings.ratio, settings.budget_rounding)
    candidates = sel.gather_candidates(assignments, None, start, stop)
    del assignments
    alpha, tau = alpha_tau(storage, settings)
    lengths = budgets_lib.sequence_lengths(sizes, budgets, settings.policy_limits())
    started = time.perf_counter()
    sequences = sel.select_in_clusters(candidates.h, candidates.u, candidates.cluster, lengths, alpha, tau,
                                       device=lm.default_device())
    result = sel.prefix(sequences, budgets)
    seconds = time.perf_counter() - started
    out = sel.selected_table(candidates, result)
    selection_fp = selection_fingerprint(storage, settings)
    sequences_out = sequences_dir(selection_fp, settings)
    storage.write_parquet(f"{sequences_out}/{range_key}.parquet", sel.selected_table(candidates, sequences))
    storage.write_parquet(f"{sequences_out}/{range_key}.clusters.parquet",
                          sel.range_cluster_table(start, stop, sizes, budgets, lengths, sequences))
    directory = range_selection_dir(selection_fp, range_key)
    digest = write_by_shard(storage, directory, f"{directory}.json", out, keys,
                            {"range": range_key, "clusters": [start, stop], "candidates": len(candidates)})
    checks = sel.check_range(candidates, result, budgets, start, stop)
    return RangeSelection(start, stop, candidates, sizes, out, checks, alpha, tau, seconds, directory, digest,
                          len(sequences))


def _range_check_results(checks: sel.RangeChecks, selected: int) -> list[dg.AssetCheckResult]:
    return [
        dg.AssetCheckResult(check_name="budgets_exact", passed=checks.budgets_exact,
                            severity=dg.AssetCheckSeverity.ERROR,
                            metadata={"selected": selected, "budget": checks.budget,
                                      "clusters_off_budget": checks.clusters_off_budget,
                                      "duplicate_ids": checks.duplicate_ids}),
        dg.AssetCheckResult(check_name="quality_signal", passed=checks.quality_signal,
                            severity=dg.AssetCheckSeverity.WARN,
                            metadata={"mean_u_selected": checks.mean_u_selected,
                                      "mean_u_candidates": checks.mean_u_candidates,
                                      "u_std_pool": checks.u_std_pool,
                                      "u_std_within_clusters": checks.u_std_within_clusters}),
    ]


# ------------------------------------------------------------------------------------------------ baselines


def _score_tables(storage: Storage, keys: list[str], method: sel.SelectionMethod) -> Callable[
        [], Iterator[tuple[str, pa.Table]]]:
    """Every shard's doc_id and the baseline's score column, from the asset that holds it, one shard at a time
    (each call of the result reads them again)."""
    columns = ["doc_id", method.score_column]
    if method.score_asset == "filtered_pool_shard":
        paths = {k: f"{layout.FILTERED_DIR.format(key=k)}/kept.parquet" for k in keys}
        layout.require_files(storage, paths, "filtered_pool_shard")
    else:
        paths = {key: predictions_path(storage, key) for key in keys}
        layout.require_files(storage, paths, "pool_predictions")
    return lambda: ((key, storage.read_parquet(path, columns=columns)) for key, path in paths.items())


def _baseline(platform: PlatformResource, name: str) -> dg.MaterializeResult:
    """A baseline of the registry at Group-MATES' total budget, streamed over the shards (twice): memory holds
    the selection and one shard, never the pool."""
    method = sel.SELECTION_METHODS[name]
    storage, settings = platform.storage(), platform.settings().selection
    keys = layout.filtered_shards(storage)
    sizes = read_cluster_sizes(storage, keys, layout.current_clusters(storage)["k"])
    budget = sel.total_budget(sizes, settings.ratio, settings.budget_rounding)
    temperature = baseline_temperature(method, settings)
    picked = sel.stream_baseline(method, _score_tables(storage, keys, method), budget, settings.random_seed,
                                 temperature)
    directory = baseline_dir(selection_fingerprint(storage, settings), name, settings.random_seed, temperature)
    digest = write_by_shard(storage, f"{directory}/shards", f"{directory}/selected.json", picked.table, keys,
                            {"method": name, "budget": budget, "pool": picked.pool})
    return dg.MaterializeResult(
        metadata={"dagster/row_count": picked.table.num_rows, "selected": picked.table.num_rows, "pool": picked.pool,
                  "budget": budget, "score": method.score_column if method.ranked else "none (seeded uniform)",
                  "pick": f"Gumbel-top-k, temperature {temperature:g}" if temperature else
                  ("top-k" if method.ranked else "seeded uniform"),
                  "mean_score_selected": finite(picked.mean_score_selected),
                  "mean_score_pool": finite(picked.mean_score_pool),
                  "sha256": digest, "path": dg.MetadataValue.path(storage.url(directory))},
        data_version=dg.DataVersion(digest[:16]),
    )


BASELINE_DEPS = [dg.AssetDep(cluster_assignments, partition_mapping=dg.AllPartitionMapping())]


@step_asset(group_name="selection", code_version="random-selection-v2", kinds={"parquet"},
          deps=BASELINE_DEPS, description=sel.SELECTION_METHODS["random"].description)
def selected_random(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _baseline(platform, "random")


@step_asset(group_name="selection", code_version="mates-selection-v2", kinds={"parquet"},
          deps=[*BASELINE_DEPS, dg.AssetDep(pool_predictions, partition_mapping=dg.AllPartitionMapping())],
          description=sel.SELECTION_METHODS["mates"].description)
def selected_mates(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _baseline(platform, "mates")


@step_asset(group_name="selection", code_version="fasttext-selection-v2", kinds={"parquet"},
          deps=BASELINE_DEPS, description=sel.SELECTION_METHODS["fasttext"].description)
def selected_fasttext(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _baseline(platform, "fasttext")


# ------------------------------------------------------------------------------------ cluster budget policies


def _cluster_rows(storage: Storage, directory: str, ranges: list[str]) -> pa.Table:
    """The per-cluster rows every range wrote (one per cluster id), in cluster order."""
    paths = {r: f"{directory}/{r}.clusters.parquet" for r in ranges}
    layout.require_files(storage, paths, "selected_documents")
    return pa.concat_tables([storage.read_parquet(p) for p in paths.values()]).sort_by("cluster")


def _policy(context: dg.AssetExecutionContext, platform: PlatformResource, name: str) -> dg.MaterializeResult:
    """A Group-MATES budget policy: per-cluster budgets from the per-cluster rows (weighted) or the merge of the
    greedy sequences (global), then each range's sequences cut at those budgets, one range at a time."""
    method = sel.SELECTION_METHODS[name]
    storage, settings = platform.storage(), platform.settings().selection
    limits, ranges = settings.policy_limits(), selection_range_keys(settings.cluster_ranges)
    selection_fp = selection_fingerprint(storage, settings)
    directory = sequences_dir(selection_fp, settings)
    clusters = _cluster_rows(storage, directory, ranges)
    ids, sizes = clusters.column("cluster").to_numpy(), clusters.column("size").to_numpy()
    uniform, benefit = clusters.column("uniform").to_numpy(), clusters.column("benefit").to_numpy()
    total = int(uniform.sum())
    sequence_paths = [f"{directory}/{r}.parquet" for r in ranges]
    layout.require_files(storage, dict(zip(ranges, sequence_paths, strict=True)), "selected_documents")
    started = time.perf_counter()
    if method.policy == budgets_lib.WEIGHTED:
        counts = budgets_lib.weighted_budgets(sizes, benefit, total, limits)
    else:
        gains = pa.concat_tables([storage.read_parquet(p, columns=["cluster", "rank", "predicted"])
                                  for p in sequence_paths])
        counts = budgets_lib.global_budgets(ids, sizes, gains.column("cluster").to_numpy(),
                                            gains.column("rank").to_numpy(), gains.column("predicted").to_numpy(),
                                            total, limits)
    seconds = time.perf_counter() - started
    out = pa.concat_tables([sel.budgeted_rows(storage.read_parquet(p), ids, counts) for p in sequence_paths])
    folder = policy_path(selection_fp, method, settings)
    table = pa.table({"cluster": ids, "size": sizes, "uniform": uniform, "budget": counts, "benefit": benefit})
    storage.write_parquet(f"{folder}/budgets.parquet", table)
    digest = write_by_shard(storage, f"{folder}/shards", f"{folder}/selected.json", out,
                            layout.filtered_shards(storage), {"method": name, "policy": method.policy, "budget": total})
    check = budgets_lib.check_budgets(counts, sizes, total, limits)
    selected = np.bincount(np.searchsorted(ids, out.column("cluster").to_numpy()), minlength=len(ids))
    duplicates = out.num_rows - len(set(out.column("doc_id").to_pylist()))
    context.log.info(f"{name}: {total:,} documents over {len(ids):,} clusters; "
                     f"{int((counts < uniform).sum()):,} clusters below their uniform budget, "
                     f"{int((counts > uniform).sum()):,} above")
    return dg.MaterializeResult(
        metadata={"dagster/row_count": out.num_rows, "selected": out.num_rows, "budget": total,
                  "policy": method.policy, "budget_floor": limits.floor, "budget_cap": limits.cap,
                  **({"weighted_sharpness": limits.sharpness} if method.policy == budgets_lib.WEIGHTED else {}),
                  "budget_seconds": round(seconds, 3), **_budget_moves(counts, uniform, sizes, limits),
                  "largest_moves": dg.MetadataValue.md(_moves_markdown(ids, sizes, uniform, counts, benefit)),
                  "sha256": digest, "path": dg.MetadataValue.path(storage.url(folder))},
        check_results=[dg.AssetCheckResult(
            check_name="budgets_exact", passed=check["passed"] and np.array_equal(selected, counts)
            and duplicates == 0, severity=dg.AssetCheckSeverity.ERROR,
            metadata={**{k: v for k, v in check.items() if k != "passed"}, "duplicate_ids": duplicates,
                      "clusters_off_budget": int((selected != counts).sum())})],
        data_version=dg.DataVersion(digest[:16]),
    )


def _budget_moves(counts: np.ndarray, uniform: np.ndarray, sizes: np.ndarray,
                  limits: budgets_lib.PolicyLimits) -> dict:
    """How far the policy moved from the uniform budgets (documents and clusters)."""
    low, high = budgets_lib.floor_counts(sizes, limits.floor), budgets_lib.cap_counts(sizes, limits.cap)
    return {"clusters_below_uniform": int((counts < uniform).sum()),
            "clusters_above_uniform": int((counts > uniform).sum()),
            "clusters_at_floor": int(((counts == low) & (sizes > 0)).sum()),
            "clusters_at_cap": int(((counts == high) & (sizes > 0)).sum()),
            "documents_moved": int(np.abs(counts - uniform).sum() // 2)}


def _moves_markdown(ids: np.ndarray, sizes: np.ndarray, uniform: np.ndarray, counts: np.ndarray,
                    benefit: np.ndarray, rows: int = 10) -> str:
    """The clusters whose budget moved most from the uniform one, both ways."""
    change = counts - uniform
    order = np.argsort(change, kind="stable")
    shown = list(dict.fromkeys([*order[:rows // 2].tolist(), *order[::-1][:rows // 2].tolist()]))
    lines = ["| cluster | documents | benefit (mean predicted) | uniform | budget |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {ids[i]} | {sizes[i]:,} | {benefit[i]:+.4f} | {uniform[i]:,} | {counts[i]:,} |" for i in shown
              if change[i] != 0]
    return "\n".join(lines)


POLICY_DEPS = [dg.AssetDep("selected_documents", partition_mapping=dg.AllPartitionMapping())]


def _budgets_check(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec("budgets_exact", asset=asset, blocking=True, description=(
        "the policy's budgets sum to Group-MATES' total exactly, every cluster lies between its floor and cap, "
        "holds exactly its budget, and no doc_id repeats"))]


@step_asset(group_name="selection", code_version="weighted-selection-v1", kinds={"parquet"}, deps=POLICY_DEPS,
            check_specs=_budgets_check("selected_weighted"),
            description=sel.SELECTION_METHODS["group_mates_weighted"].description)
def selected_weighted(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _policy(context, platform, "group_mates_weighted")


@step_asset(group_name="selection", code_version="global-selection-v1", kinds={"parquet"}, deps=POLICY_DEPS,
            check_specs=_budgets_check("selected_global"),
            description=sel.SELECTION_METHODS["group_mates_global"].description)
def selected_global(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _policy(context, platform, "group_mates_global")


# ------------------------------------------------------------------------------------------- selected corpus


@dataclass(frozen=True)
class SelectionFiles:
    """Where the current selection of every method is, checked complete (every summary written) once per run;
    :meth:`of_shard` then reads one shard's rows alone."""

    group_mates: list[str]  # range folders, in range order
    baselines: dict[str, str]  # method -> folder of its per-shard files (the baselines and the budget policies)

    def of_shard(self, storage: Storage, key: str) -> dict[str, pa.Table]:
        """Every method's selected rows of shard ``key`` (Group-MATES: the ranges' rows in range order), each with
        a doc_id column."""
        paths = {"group_mates": [f"{d}/{key}.parquet" for d in self.group_mates],
                 **{method: [f"{d}/{key}.parquet"] for method, d in self.baselines.items()}}
        return {method: pa.concat_tables([_read_selection(storage, p, key) for p in paths[method]])
                for method in sel.SELECTION_METHODS if method in paths}


def _read_selection(storage: Storage, path: str, key: str) -> pa.Table:
    try:
        return storage.read_parquet(path)
    except FileNotFoundError:  # the summaries exist, so the shard was not in the pool when they were made
        raise layout.MissingArtifactError(f"no selection file for shard {key} ({storage.url(path)}); the selections "
                                          "were made without this shard: rematerialize them") from None


def selection_files(storage: Storage, settings: SelectionProfile, ranges: int) -> SelectionFiles:
    """The current selections of every method (Group-MATES: all cluster ranges); fails naming the asset to
    materialize when one is not complete."""
    fp = selection_fingerprint(storage, settings)
    folders = {r: range_selection_dir(fp, r) for r in selection_range_keys(ranges)}
    layout.require_files(storage, {r: f"{d}.json" for r, d in folders.items()}, "selected_documents")
    baselines = {}
    for method in sel.baseline_methods():
        directory = baseline_dir(fp, method.name, settings.random_seed, baseline_temperature(method, settings))
        if not storage.exists(f"{directory}/selected.json"):
            raise FileNotFoundError(f"no current selection for {method.name}; materialize {method.asset} first")
        baselines[method.name] = f"{directory}/shards"
    for method in sel.policy_methods():
        directory = policy_path(fp, method, settings)
        if not storage.exists(f"{directory}/selected.json"):
            raise FileNotFoundError(f"no current selection for {method.name}; materialize {method.asset} first")
        baselines[method.name] = f"{directory}/shards"
    return SelectionFiles(list(folders.values()), baselines)


def selection_tables(storage: Storage, settings: SelectionProfile, ranges: int, key: str) -> dict[str, pa.Table]:
    """The current selection of every method in shard ``key`` (see :class:`SelectionFiles`)."""
    return selection_files(storage, settings, ranges).of_shard(storage, key)


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


@step_asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="selection",
    code_version="selected-corpus-v3",
    deps=["filtered_pool_shard", dg.AssetDep(selected_documents, partition_mapping=dg.AllPartitionMapping()),
          selected_random, selected_mates, selected_fasttext, selected_weighted, selected_global],
    kinds={"parquet", "json"},
    check_specs=[blocking_check(
        "index_round_trip", "selected_corpus",
        "T17: every selected id of this shard was found by doc_id, and the text written hashes to the "
        "text that was embedded")],
)
def selected_corpus(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The selected documents of a shard for every method, as DCLM-format JSON lines (zstd): the original record plus
    doc_id and the selection fields; joined with the filtered pool by doc_id. Reads only this shard's rows of each
    selection."""
    shard_keys(context)
    storage, profile = platform.storage(), platform.settings()
    settings = profile.selection
    files = selection_files(storage, settings, settings.cluster_ranges)
    provenance = finite(lineage(context, storage))

    def write(key: str) -> PartitionResult:
        key = validate_shard_key(key)
        assignments = read_assignments(storage, [key], ["doc_id", "cluster"])[key]
        return write_corpus_shard(storage, settings, files.of_shard(storage, key), provenance, key,
                                  profile.pool.group_field, assignments)

    return materialize_partitions(context, write, check_name="index_round_trip")


def write_corpus_shard(storage: Storage, settings: SelectionProfile, tables: dict[str, pa.Table], provenance: dict,
                       key: str, group_field: str | None = None,
                       assignments: pa.Table | None = None) -> PartitionResult:
    """The shard's selected documents of every method as JSON lines, joined by doc_id, and (given the shard's
    cluster assignments) every corpus's documents by cluster and source; the stats file goes last. ``tables``: each
    method's selection (this shard's rows, or more: rows of other shards are left out)."""
    key = validate_shard_key(key)
    kept = storage.read_parquet(f"{layout.FILTERED_DIR.format(key=key)}/kept.parquet")
    embedded = read_predictions(storage, [key], ["doc_id", "text_hash"])[key]
    embedded_hash = dict(zip(embedded.column("doc_id").to_pylist(), embedded.column("text_hash").to_pylist(),
                             strict=True))
    counts, missing, mismatched, files = {}, 0, 0, {}
    for method, table in tables.items():
        shard = corpus_lib.write_selected_shard(kept, table, method, key, embedded_hash)
        info = storage.write_bytes(f"{layout.SELECTED_CORPUS_DIR}/{method}/{key}.jsonl.zst", shard.data)
        counts[method], files[method] = shard.documents, info.sha256
        missing, mismatched = missing + shard.ids_not_found, mismatched + shard.text_hash_mismatches
    passed = missing == 0 and mismatched == 0
    if assignments is not None:
        storage.write_parquet(layout.SELECTED_COMPOSITION.format(key=key),
                              composition.shard_composition(kept, tables, key, assignments, group_field))
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
