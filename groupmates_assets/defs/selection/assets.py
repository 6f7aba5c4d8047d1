"""Selection stage: score the filtered pool with the final model, cluster it in the relationship space, select
greedily inside each cluster (Group-MATES), the baselines at the same budget, and the selected corpora with
per-document lineage."""

import time

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


def range_selection_path(selection_fp: str, range_key: str) -> str:
    """Group-MATES' selection of one range of clusters (``selection_fp``: :func:`selection_fingerprint`)."""
    return f"{layout.SELECTIONS_DIR}/group_mates/{selection_fp}/{range_key}.parquet"


def sequences_dir(selection_fp: str, settings: SelectionProfile) -> str:
    """Every cluster's greedy sequence up to its cap (``<range>.parquet``) and one row per cluster
    (``<range>.clusters.parquet``), written by ``selected_documents`` for the budget policies."""
    fingerprint = layout.fingerprint(selection=selection_fp, cap=settings.policy_limits().cap)
    return f"{layout.SELECTIONS_DIR}/sequences/{fingerprint}"


def policy_path(selection_fp: str, method: sel.SelectionMethod, settings: SelectionProfile) -> str:
    """A budget policy's selection (``selected.parquet``, ``budgets.parquet``), versioned by Group-MATES' selection
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


def baseline_path(selection_fp: str, method: str, seed: int, temperature: float = 0.0) -> str:
    """A baseline's selection, versioned by Group-MATES' (whose budget it takes), its seed and, when it samples,
    its Gumbel-top-k temperature."""
    sampling = {"temperature": temperature} if temperature else {}
    fingerprint = layout.fingerprint(selection=selection_fp, method=method, seed=seed, **sampling)
    return f"{layout.SELECTIONS_DIR}/{method}/{fingerprint}/selected.parquet"


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
    counts = {key: storage.read_parquet(path, columns=["u"]).num_rows for key, path in paths.items()}
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


def assignments_path(storage: Storage, key: str) -> str:
    return f"{layout.CLUSTERS_DIR}/{layout.current_clusters(storage)['fingerprint']}/assignments/{key}.parquet"


@step_asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="selection",
    code_version="cluster-assignments-v1",
    deps=[cluster_centroids, pool_predictions],
    kinds={"faiss", "parquet"},
)
def cluster_assignments(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Each document of a shard assigned to its nearest centroid (largest inner product with the unit-norm centroids):
    doc_id, cluster, similarity."""
    shard_keys(context)
    storage = platform.storage()
    current = layout.current_clusters(storage)
    centroids = np.asarray(storage.read_numpy(f"{layout.CLUSTERS_DIR}/{current['fingerprint']}/centroids.npy"))
    return materialize_partitions(context, lambda key: assign_shard(storage, current, centroids, key))


def assign_shard(storage: Storage, current: dict, centroids: np.ndarray, key: str) -> PartitionResult:
    key = validate_shard_key(key)
    table = read_predictions(storage, [key], ["doc_id", "h"])[key]
    clusters, similarity = clustering.assign(sel.embeddings(table), centroids) if table.num_rows else (
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
    floor/ceil(r x |C|) documents. Rows: doc_id, shard, cluster, rank, u, predicted influence. Each cluster's
    sequence is computed on up to its cap (selection.budget_cap) and kept, with one row per cluster, for the
    budget policies (selected_weighted, selected_global); the uniform selection is its prefix."""
    storage, settings = platform.storage(), platform.settings().selection
    current, keys = layout.current_clusters(storage), layout.filtered_shards(storage)
    start, stop = sel.range_bounds(context.partition_key, current["k"])
    assignments = read_assignments(storage, keys)
    sizes = sel.cluster_sizes(list(assignments.values()), current["k"])
    budgets = sel.cluster_budgets(sizes, settings.ratio, settings.budget_rounding)
    candidates = sel.gather_candidates(assignments, read_predictions(storage, keys, ["doc_id", "h", "u"]), start,
                                       stop)
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
    storage.write_parquet(f"{sequences_out}/{context.partition_key}.parquet", sel.selected_table(candidates, sequences))
    storage.write_parquet(f"{sequences_out}/{context.partition_key}.clusters.parquet",
                          sel.range_cluster_table(start, stop, sizes, budgets, lengths, sequences))
    info = storage.write_parquet(range_selection_path(selection_fp, context.partition_key), out)
    checks = sel.check_range(candidates, result, budgets, start, stop)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": out.num_rows, "selected": out.num_rows, "candidates": len(candidates),
            "clusters": stop - start, "cluster_range": f"[{start}, {stop})", "alpha": alpha, "tau": tau,
            "learned_alpha_tau": settings.learned_alpha_tau, "ratio": settings.ratio,
            "budget_rounding": settings.budget_rounding, "select_seconds": round(seconds, 3),
            "sequence_rows": len(sequences), "budget_cap": settings.policy_limits().cap,
            "documents_per_second": round(len(candidates) / seconds, 1) if seconds and len(candidates) else None,
            "mean_u_selected": checks.mean_u_selected, "mean_u_candidates": checks.mean_u_candidates,
            "sha256": info.sha256,
            "cluster_size_histogram": dg.MetadataValue.md(_size_histogram(sizes[start:stop], "cluster sizes"))
            if stop > start else "",
            "path": dg.MetadataValue.path(info.path),
        },
        check_results=_range_check_results(checks, out.num_rows),
        data_version=dg.DataVersion(info.sha256[:16]),
    )


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


def _score_tables(storage: Storage, keys: list[str], method: sel.SelectionMethod) -> dict[str, pa.Table]:
    """Every shard's doc_id and the baseline's score column, from the asset that holds it."""
    columns = ["doc_id", method.score_column]
    if method.score_asset == "filtered_pool_shard":
        return {k: storage.read_parquet(f"{layout.FILTERED_DIR.format(key=k)}/kept.parquet", columns=columns)
                for k in keys}
    return read_predictions(storage, keys, columns)


def _baseline(platform: PlatformResource, name: str) -> dg.MaterializeResult:
    """A baseline of the registry at Group-MATES' total budget."""
    method = sel.SELECTION_METHODS[name]
    storage, settings = platform.storage(), platform.settings().selection
    keys = layout.filtered_shards(storage)
    k = layout.current_clusters(storage)["k"]
    sizes = sel.cluster_sizes(list(read_assignments(storage, keys).values()), k)
    budget = sel.total_budget(sizes, settings.ratio, settings.budget_rounding)
    pool = sel.scored_pool(_score_tables(storage, keys, method), method.score_column)
    temperature = baseline_temperature(method, settings)
    rows = sel.select_baseline(method, pool, budget, settings.random_seed, temperature)
    out = sel.baseline_table(method, pool, rows)
    info = storage.write_parquet(baseline_path(selection_fingerprint(storage, settings), name, settings.random_seed,
                                               temperature), out)
    scores = pool.scores
    return dg.MaterializeResult(
        metadata={"dagster/row_count": out.num_rows, "selected": out.num_rows, "pool": len(pool.doc_ids),
                  "budget": budget, "score": method.score_column if method.ranked else "none (seeded uniform)",
                  "pick": f"Gumbel-top-k, temperature {temperature:g}" if temperature else
                  ("top-k" if method.ranked else "seeded uniform"),
                  "mean_score_selected": finite(float(scores[rows].mean())) if len(rows) else None,
                  "mean_score_pool": finite(float(scores.mean())) if len(scores) else None,
                  "sha256": info.sha256, "path": dg.MetadataValue.path(info.path)},
        data_version=dg.DataVersion(info.sha256[:16]),
    )


BASELINE_DEPS = [dg.AssetDep(cluster_assignments, partition_mapping=dg.AllPartitionMapping())]


@step_asset(group_name="selection", code_version="random-selection-v1", kinds={"parquet"},
          deps=BASELINE_DEPS, description=sel.SELECTION_METHODS["random"].description)
def selected_random(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _baseline(platform, "random")


@step_asset(group_name="selection", code_version="mates-selection-v1", kinds={"parquet"},
          deps=[*BASELINE_DEPS, dg.AssetDep(pool_predictions, partition_mapping=dg.AllPartitionMapping())],
          description=sel.SELECTION_METHODS["mates"].description)
def selected_mates(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    return _baseline(platform, "mates")


@step_asset(group_name="selection", code_version="fasttext-selection-v1", kinds={"parquet"},
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
    info = storage.write_parquet(f"{folder}/selected.parquet", out)
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
                  "sha256": info.sha256, "path": dg.MetadataValue.path(info.path)},
        check_results=[dg.AssetCheckResult(
            check_name="budgets_exact", passed=check["passed"] and np.array_equal(selected, counts)
            and duplicates == 0, severity=dg.AssetCheckSeverity.ERROR,
            metadata={**{k: v for k, v in check.items() if k != "passed"}, "duplicate_ids": duplicates,
                      "clusters_off_budget": int((selected != counts).sum())})],
        data_version=dg.DataVersion(info.sha256[:16]),
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


def selection_tables(storage: Storage, settings: SelectionProfile, ranges: int) -> dict[str, pa.Table]:
    """The current selection of every method (Group-MATES: all cluster ranges), each with a doc_id column."""
    fp = selection_fingerprint(storage, settings)
    paths = {r: range_selection_path(fp, r) for r in selection_range_keys(ranges)}
    layout.require_files(storage, paths, "selected_documents")
    out = {"group_mates": pa.concat_tables([storage.read_parquet(p) for p in paths.values()])}
    for method in sel.baseline_methods():
        path = baseline_path(fp, method.name, settings.random_seed, baseline_temperature(method, settings))
        if not storage.exists(path):
            raise FileNotFoundError(f"no current selection for {method.name}; materialize {method.asset} first")
        out[method.name] = storage.read_parquet(path)
    for method in sel.policy_methods():
        path = f"{policy_path(fp, method, settings)}/selected.parquet"
        if not storage.exists(path):
            raise FileNotFoundError(f"no current selection for {method.name}; materialize {method.asset} first")
        out[method.name] = storage.read_parquet(path)
    return {name: out[name] for name in sel.SELECTION_METHODS}


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
    code_version="selected-corpus-v2",
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
    doc_id and the selection fields; joined with the filtered pool by doc_id."""
    shard_keys(context)
    storage, profile = platform.storage(), platform.settings()
    settings = profile.selection
    tables = selection_tables(storage, settings, settings.cluster_ranges)
    provenance = finite(lineage(context, storage))
    return materialize_partitions(context, lambda key: write_corpus_shard(
        storage, settings, tables, provenance, key, profile.pool.group_field,
        read_assignments(storage, [validate_shard_key(key)])[key]), check_name="index_round_trip")


def write_corpus_shard(storage: Storage, settings: SelectionProfile, tables: dict[str, pa.Table], provenance: dict,
                       key: str, group_field: str | None = None,
                       assignments: pa.Table | None = None) -> PartitionResult:
    """The shard's selected documents of every method as JSON lines, joined by doc_id, and (given the shard's
    cluster assignments) every corpus's documents by cluster and source; the stats file goes last."""
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
