"""Quality stage: the DCLM fastText classifier and the filtered pool, shard by shard."""


import os
import tempfile
from collections.abc import Callable
from typing import Any

import dagster as dg
import fsspec
import numpy as np

from groupmates_assets.defs.common import (
    PartitionResult,
    PermanentFailure,
    blocking_check,
    materialize_partitions,
    missing_is_permanent,
    shard_batches,
    shard_keys,
)
from groupmates_assets.defs.deployment import step_asset
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import current_shard_keys
from groupmates_assets.lib import filtering, layout, plots
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib.heldout import is_heldout
from groupmates_assets.lib.pool_sample import SampledDoc, sample_shards, spread
from groupmates_assets.lib.quality import (
    HQ_LABEL,
    QualityClassifier,
    calibrate,
    classifier_manifest,
    train_on_samples,
)
from groupmates_assets.lib.storage import Storage, sha256_stream
from groupmates_assets.settings import QualityProfile, with_overrides

CALIBRATION_SAMPLE = 10_000  # pool documents scored to place a keep-fraction threshold for a supplied model


class QualityClassifierConfig(dg.Config):
    """Overrides of the profile's quality settings for one run (None keeps the profile's value)."""

    model_path: str | None = None
    hq_label: str | None = None
    threshold: float | None = None
    keep_fraction: float | None = None
    positives_path: str | None = None


def _positives(storage: Storage, quality: QualityProfile, group_field: str | None) -> list[SampledDoc]:
    if quality.positives_path:
        fs, path = fsspec.core.url_to_fs(quality.positives_path)
        name = os.path.basename(path)
        fmt = shard_io.shard_format(name)
        if fmt is None:
            raise PermanentFailure(f"positives file {quality.positives_path} is not a .jsonl[.gz|.zst] or .parquet "
                                   "file")
        source = shard_io.ShardFile("positives", path, name, fmt, int(fs.size(path)))
    else:
        fs = storage.fs
        rel = layout.EMBEDDED_POSITIVES
        if not storage.exists(rel):
            raise PermanentFailure(f"no positives at {storage.url(rel)}: materialize embedded_pool or set "
                                   "positives_path")
        source = shard_io.ShardFile("positives", storage.path(rel), rel, "jsonl.zst", 0)
    return sample_shards(fs, [source], quality.max_positives, quality.recipe.seed, group_field)


@step_asset(
    group_name="quality",
    code_version="quality-classifier-v2",  # v2: pool negatives exclude the held-out slice
    deps=["embedded_pool", dg.AssetDep("pool_shard", partition_mapping=dg.AllPartitionMapping())],
    kinds={"fasttext"},
)
def quality_classifier(
    context: dg.AssetExecutionContext, config: QualityClassifierConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    """DCLM-recipe fastText bigram classifier (high-quality positives vs negatives sampled from the pool) or a supplied
    .bin, with the keep threshold every shard is filtered with."""
    storage = platform.storage()
    profile = with_overrides(platform.settings(), **config.model_dump())
    quality, group_field, heldout_fraction = profile.quality, profile.pool.group_field, profile.pool.heldout_fraction
    shards = layout.registered_shards(storage, current_shard_keys(context.instance, platform))
    if not shards:
        raise PermanentFailure("no registered pool shards: materialize pool_shard partitions first")
    fs, _ = platform.pool_location()
    sample_from = spread(shards, quality.negative_sample_shards)
    unreadable: list[str] = []

    def skip_unreadable(error: shard_io.ShardReadError) -> None:
        context.log.warning(f"left out of the pool sample: {error}")
        unreadable.append(error.path)

    def sample_pool(wanted: int) -> list[SampledDoc]:
        return sample_shards(fs, sample_from, wanted, quality.recipe.seed, group_field, on_unreadable=skip_unreadable,
                             exclude=lambda text: is_heldout(text, heldout_fraction))
    with tempfile.TemporaryDirectory(prefix="groupmates-classifier-") as tmp:
        model_file = os.path.join(tmp, "model.bin")
        if quality.model_path:
            classifier, report, training, calibration_docs = _supplied_classifier(storage, quality, model_file,
                                                                                  sample_pool)
        else:
            positives = _positives(storage, quality, group_field)
            wanted = int(len(positives) * quality.negatives_per_positive)
            context.log.info(f"sampling {wanted} negatives from {len(sample_from)} of {len(shards)} pool shards")
            report, calibration_docs = train_on_samples(positives, sample_pool(wanted), model_file, quality.recipe,
                                                        quality.heldout_fraction)
            training = {"recipe": "DCLM fastText bigram, positives vs pool negatives", **quality.recipe.as_dict()}
            classifier = QualityClassifier(model_file, HQ_LABEL)
        calibration = calibrate(classifier, calibration_docs, quality.threshold, quality.keep_fraction)
        with open(model_file, "rb") as handle:
            version = sha256_stream(handle)[0][:12]
        model_info = storage.put_file(model_file, f"{layout.CLASSIFIER_DIR}/{version}/model.bin")
    manifest = classifier_manifest(version, f"{layout.CLASSIFIER_DIR}/{version}/model.bin", model_info.sha256,
                                   classifier.hq_label, calibration, training, report,
                                   [s.key for s in sample_from], unreadable)
    storage.write_json(f"{layout.CLASSIFIER_DIR}/{version}/classifier.json", manifest)
    layout.write_pointer(storage, layout.CLASSIFIER_DIR, manifest)  # what the filter reads; written last
    return dg.MaterializeResult(metadata=_classifier_metadata(manifest, report, model_info.path),
                                data_version=dg.DataVersion(version))


def _supplied_classifier(storage: Storage, quality: QualityProfile, model_file: str,
                         sample_pool: Callable[[int], list[SampledDoc]]
                         ) -> tuple[QualityClassifier, None, dict[str, Any], list[SampledDoc]]:
    """(classifier, no training report, its provenance, a pool sample to calibrate on) for a supplied model."""
    assert quality.model_path is not None
    source = _fetch_model(storage, quality.model_path, model_file)
    calibration_docs = sample_pool(CALIBRATION_SAMPLE)
    return _load_supplied_model(model_file, quality.hq_label, source), None, {"supplied_model": source}, \
        calibration_docs


def _fetch_model(storage: Storage, source: str, target: str) -> str:
    """Copy a supplied fastText model to a local path; a relative path is taken inside the storage root."""
    if "://" not in source and not os.path.isabs(source):
        source = storage.url(source)
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise PermanentFailure(f"supplied quality model not found: {source} (place the .bin there or set model_path)")
    fs.get(path, target)
    return source


def _load_supplied_model(model_file: str, hq_label: str | None, source: str) -> QualityClassifier:
    """A supplied file fastText cannot load, or without a known high-quality label, fails naming the source
    (fastText's own message names only the local copy)."""
    try:
        return QualityClassifier(model_file, hq_label)
    except ValueError as exc:
        raise PermanentFailure(f"supplied quality model {source} cannot be used: "
                              f"{str(exc).replace(model_file, source)}") from None


def _classifier_metadata(manifest: dict, report, model_path: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "classifier_version": manifest["version"],
        "model_sha256": manifest["model_sha256"],
        "model_path": dg.MetadataValue.path(model_path),
        "threshold": manifest["threshold"],
        "threshold_rule": manifest["threshold_rule"],
        "training_recipe": dg.MetadataValue.json(manifest["training"]),
        "calibration_keep_rate": manifest["calibration_keep_rate"],
        "keep_rate_by_group": dg.MetadataValue.md(filtering.keep_rate_table(manifest["calibration_by_group"])),
    }
    if report is not None:
        edges = np.linspace(0, 1, 21)
        hq = np.histogram(report.heldout_scores_hq, bins=edges)[0]
        lq = np.histogram(report.heldout_scores_lq, bins=edges)[0]
        metadata.update({
            "positives_train": report.positives_train, "negatives_train": report.negatives_train,
            "positives_heldout": report.positives_heldout, "negatives_heldout": report.negatives_heldout,
            "heldout_accuracy": round(report.heldout_accuracy, 4), "heldout_auc": round(report.heldout_auc, 4),
            "heldout_score_histogram": dg.MetadataValue.md(
                "**high-quality held-out**\n\n" + plots.png_markdown(plots.histogram_png(
                    edges.tolist(), hq.tolist(), "held-out positives", "P(high quality)", manifest["threshold"]),
                    "positives")
                + "\n\n**pool held-out**\n\n" + plots.png_markdown(plots.histogram_png(
                    edges.tolist(), lq.tolist(), "held-out pool documents", "P(high quality)",
                    manifest["threshold"]), "pool")),
        })
    return metadata


@step_asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="quality",
    code_version=filtering.FILTER_VERSION,
    deps=["pool_shard", quality_classifier],
    kinds={"parquet"},
    check_specs=[blocking_check(
        "counts_reconcile", "filtered_pool_shard",
        "in = kept + dropped + rejected + held out, from the written files and an independent recount of "
        "the source shard's records")],
)
def filtered_pool_shard(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """One pool shard scored by the quality classifier: kept documents with doc_id and score, the dropped ones for
    inspection, malformed records with file, line and reason, and the held-out slice set aside before scoring."""
    storage = platform.storage()
    unregistered = [key for key in shard_keys(context) if layout.registered_shard(storage, key) is None]
    if unregistered:
        raise PermanentFailure(f"pool shard {unregistered[0]!r} is not registered: materialize pool_shard for this "
                               "partition first")
    with missing_is_permanent():
        current = layout.current_classifier(storage)
    if not storage.exists(current["model"]):
        raise PermanentFailure(f"quality model {storage.url(current['model'])} named by "
                               f"{storage.url(layout.CURRENT_CLASSIFIER)} is missing: rematerialize quality_classifier")
    with storage.local_copy(current["model"], cache=True) as model_path:  # every filter run reads it
        classifier = QualityClassifier(model_path, current["hq_label"])
    return materialize_partitions(context, lambda key: filter_one_shard(context, platform, classifier, current, key),
                                  check_name="counts_reconcile")


def filter_one_shard(context: dg.AssetExecutionContext, platform: PlatformResource, classifier: QualityClassifier,
                     current: dict, key: str) -> PartitionResult:
    """Score one shard, write kept/dropped/rejected, and recount the source independently for the check."""
    storage = platform.storage()
    shard = layout.registered_shard(storage, key)
    assert shard is not None  # checked for every partition of the run before the classifier was loaded
    fs, _ = platform.pool_location()
    out_dir = layout.FILTERED_DIR.format(key=key)
    profile = platform.settings()
    context.log.info(f"filtering {shard.path} ({shard.size / 1e6:.1f} MB) with classifier {current['version']}, "
                     f"threshold {current['threshold']:.6g}")
    try:
        stats = filtering.filter_shard(
            shard, fs, classifier, current["threshold"], storage, out_dir,
            batch_size=profile.quality.batch_size, group_field=profile.pool.group_field,
            heldout_fraction=profile.pool.heldout_fraction,
            progress=lambda p: context.log.info(
                f"{key}: {p['rows_in']:,} records in {p['seconds']} s (kept {p['kept']:,}, dropped "
                f"{p['dropped']:,}, rejected {p['rejected']:,}, held out {p['heldout']:,})"),
            extra_stats={"classifier_version": current["version"], "classifier_sha256": current["model_sha256"]},
        )
        source_records = filtering.count_source_records(fs, shard)
    except shard_io.ShardReadError as exc:
        raise PermanentFailure(description=str(exc)) from None
    ok, details = filtering.verify_filtered_shard(storage, out_dir, source_records)
    if stats["rejected"]:
        context.log.warning(f"{key}: {stats['rejected']} malformed records: {stats['reject_reasons']} "
                            f"(see {stats['files']['rejects']['path']})")
    return PartitionResult(metadata=_filtered_metadata(stats), data_version=stats["files"]["kept"]["sha256"][:16],
                           check_passed=ok, check_metadata=details)


def _filtered_metadata(stats: dict[str, Any]) -> dict[str, Any]:
    hist = stats["score_histogram"]
    png = plots.histogram_png(hist["bin_edges"], hist["counts"], f"{stats['shard_key']}: quality scores",
                              "P(high quality)", stats["threshold"])
    metadata: dict[str, Any] = {
        "dagster/row_count": stats["kept"],
        "rows_in": stats["rows_in"], "kept": stats["kept"], "dropped": stats["dropped"],
        "rejected": stats["rejected"], "heldout": stats["heldout"],
        "keep_rate": filtering.keep_rate(stats["kept"], stats["dropped"]),
        "threshold": stats["threshold"],
        "classifier_version": stats["classifier_version"],
        "score_histogram": dg.MetadataValue.md(plots.png_markdown(png, "score histogram")),
        "docs_per_second": stats["docs_per_second"], "mb_per_second": stats["mb_per_second"],
        "kept_path": dg.MetadataValue.path(stats["files"]["kept"]["path"]),
        "dropped_path": dg.MetadataValue.path(stats["files"]["dropped"]["path"]),
        "rejects_path": dg.MetadataValue.path(stats["files"]["rejects"]["path"]),
        "heldout_path": dg.MetadataValue.path(stats["files"]["heldout"]["path"]),
        "kept_sha256": stats["files"]["kept"]["sha256"],
        "source_path": dg.MetadataValue.path(stats["source_path"]),
    }
    if stats["reject_reasons"]:
        metadata["reject_reasons"] = dg.MetadataValue.json(stats["reject_reasons"])
    if stats["by_group"]:
        metadata["keep_rate_by_group"] = dg.MetadataValue.md(filtering.keep_rate_table(stats["by_group"]))
    return metadata


@step_asset(
    group_name="quality",
    code_version="filtered-pool-summary-v2",
    deps=[dg.AssetDep(filtered_pool_shard, partition_mapping=dg.AllPartitionMapping())],
    kinds={"json"},
    check_specs=[blocking_check(
        "all_shards_reconcile", "filtered_pool_summary",
        "every filtered shard's in = kept + dropped + rejected + held out, and the totals add up")],
)
def filtered_pool_summary(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """The filtered pool as a whole: totals, keep rates and held-out counts by source, the merged score histogram,
    and a manifest of every shard's kept file (what later stages read)."""
    storage = platform.storage()
    pool = set(context.instance.get_dynamic_partitions(pool_shards.name))
    filtered = [key for key in storage.list(layout.FILTERED_POOL_DIR) if not key.startswith("_")]
    gone = [key for key in filtered if key not in pool]
    if gone:  # filtered before their file left the pool (or from a pool this instance saw before)
        context.log.warning(f"{len(gone)} filtered shards are no longer in the pool; left out: {_names(gone)}")
    shard_stats, incomplete = filtering.read_shard_stats(storage, [key for key in filtered if key in pool])
    for key in incomplete:
        context.log.warning(f"filtered shard {key} has no {filtering.STATS_FILE} (incomplete run?); left out")
    if not shard_stats:
        raise PermanentFailure("no filtered shards yet: materialize filtered_pool_shard partitions first")
    summary = filtering.summarize_pool(shard_stats)
    info = storage.write_json(layout.FILTERED_MANIFEST, summary.manifest())
    versions = ", ".join(summary.classifier_versions)
    return dg.MaterializeResult(
        metadata=_summary_metadata(summary, gone, info.path),
        check_results=[dg.AssetCheckResult(
            check_name="all_shards_reconcile", passed=summary.reconciles, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"unbalanced_shards": ", ".join(summary.unbalanced) or "none", "classifier_versions": versions},
        )],
        data_version=dg.DataVersion(info.sha256[:16]),
    )


def _summary_metadata(summary: filtering.PoolSummary, gone: list[str], manifest_path: str) -> dict[str, Any]:
    totals, edges, counts = summary.totals, summary.bin_edges, summary.counts
    png = plots.histogram_png(edges, counts, "filtered pool: quality scores", "P(high quality)", summary.threshold)
    return {
        "dagster/row_count": totals["kept"], **totals, "shards": len(summary.shard_stats),
        "keep_rate": filtering.keep_rate(totals["kept"], totals["dropped"]),
        "classifier_versions": ", ".join(summary.classifier_versions),
        "score_histogram": dg.MetadataValue.md(plots.png_markdown(png, "score histogram")
                                               + "\n\n" + plots.histogram_table(edges, counts)),
        "keep_rate_by_group": dg.MetadataValue.md(filtering.keep_rate_table(summary.by_group))
        if summary.by_group else "",
        "heldout_by_group": dg.MetadataValue.json({g: c["heldout"] for g, c in sorted(summary.by_group.items())}),
        "manifest": dg.MetadataValue.path(manifest_path),
        "shards_no_longer_in_pool": len(gone), "left_out_shards": _names(gone),
    }


def _names(keys: list[str], shown: int = 20) -> str:
    """Up to ``shown`` keys, then how many more: a report line must stay short at 10,000 shards."""
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "") or "none"
