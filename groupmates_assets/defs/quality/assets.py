"""Quality stage: the DCLM fastText classifier and the filtered pool, shard by shard."""


import os
import tempfile
from typing import Any

import dagster as dg
import fsspec
import numpy as np

from groupmates_assets.defs.common import (
    PartitionResult,
    PermanentFailure,
    materialize_partitions,
    missing_is_permanent,
    shard_batches,
    shard_keys,
)
from groupmates_assets.defs.deployment import STEP_RETRY
from groupmates_assets.defs.partitions import pool_shards
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import current_shard_keys
from groupmates_assets.lib import filtering, layout, plots
from groupmates_assets.lib import shards as shard_io
from groupmates_assets.lib.pool_sample import SampledDoc, sample_shards, spread
from groupmates_assets.lib.quality import (
    HQ_LABEL,
    QualityClassifier,
    split_heldout,
    threshold_for_keep_fraction,
    train_quality_classifier,
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


def _calibrate(classifier: QualityClassifier, quality: QualityProfile, sample: list[SampledDoc]) -> dict[str, Any]:
    """Threshold (given, or placed at the keep-fraction quantile of a pool sample) and keep rates by group."""
    scores = classifier.score([d.text for d in sample]) if sample else np.zeros(0, np.float32)
    if quality.threshold is not None:
        threshold, rule = float(quality.threshold), f"fixed threshold {quality.threshold}"
    elif quality.keep_fraction is not None:
        threshold = threshold_for_keep_fraction(scores, quality.keep_fraction)
        rule = f"keep fraction {quality.keep_fraction} of {len(sample)} held-out pool documents"
    else:
        raise PermanentFailure("quality settings need a threshold or a keep_fraction")
    groups: dict[str, list[int]] = {}
    for doc, score in zip(sample, scores.tolist(), strict=True):
        counts = groups.setdefault(doc.group or "(none)", [0, 0])
        counts[0] += 1
        counts[1] += score >= threshold
    return {"threshold": threshold, "threshold_rule": rule, "calibration_documents": len(sample),
            "calibration_keep_rate": float((scores >= threshold).mean()) if len(scores) else None,
            "calibration_by_group": {g: {"in": c[0], "kept": c[1]} for g, c in sorted(groups.items())}}


def _group_table(by_group: dict[str, dict[str, int]]) -> str:
    rows = ["| group | documents | kept | keep rate |", "|---|---:|---:|---:|"]
    for group, c in sorted(by_group.items(), key=lambda item: -item[1]["in"]):
        rows.append(f"| {group} | {c['in']} | {c['kept']} | {c['kept'] / c['in']:.1%} |")
    return "\n".join(rows)


@dg.asset(
    group_name="quality",
    code_version="quality-classifier-v1",
    retry_policy=STEP_RETRY,
    deps=["embedded_pool", dg.AssetDep("pool_shard", partition_mapping=dg.AllPartitionMapping())],
    kinds={"fasttext"},
    description="DCLM-recipe fastText bigram classifier (high-quality positives vs negatives sampled from the "
    "pool) or a supplied .bin, with the keep threshold every shard is filtered with.",
)
def quality_classifier(
    context: dg.AssetExecutionContext, config: QualityClassifierConfig, platform: PlatformResource
) -> dg.MaterializeResult:
    storage = platform.storage()
    profile = with_overrides(platform.settings(), **config.model_dump())
    quality, group_field = profile.quality, profile.pool.group_field
    shards = layout.registered_shards(storage, current_shard_keys(context.instance, platform))
    if not shards:
        raise PermanentFailure("no registered pool shards: materialize pool_shard partitions first")
    fs, _ = platform.pool_location()
    sample_from = spread(shards, quality.negative_sample_shards)
    unreadable: list[str] = []

    def skip_unreadable(error: shard_io.ShardReadError) -> None:
        context.log.warning(f"left out of the pool sample: {error}")
        unreadable.append(error.path)
    with tempfile.TemporaryDirectory(prefix="groupmates-classifier-") as tmp:
        model_file = os.path.join(tmp, "model.bin")
        if quality.model_path:
            source = _fetch_model(storage, quality.model_path, model_file)
            report, recipe = None, {"supplied_model": source}
            calibration_docs = sample_shards(fs, sample_from, CALIBRATION_SAMPLE, quality.recipe.seed, group_field,
                                             on_unreadable=skip_unreadable)
        else:
            positives = _positives(storage, quality, group_field)
            wanted = int(len(positives) * quality.negatives_per_positive)
            context.log.info(f"sampling {wanted} negatives from {len(sample_from)} of {len(shards)} pool shards")
            negatives = sample_shards(fs, sample_from, wanted, quality.recipe.seed, group_field,
                                      on_unreadable=skip_unreadable)
            pos_train, pos_held = split_heldout(positives, _doc_id, quality.heldout_fraction, quality.recipe.seed)
            neg_train, neg_held = split_heldout(negatives, _doc_id, quality.heldout_fraction, quality.recipe.seed)
            report = train_quality_classifier(
                [d.text for d in pos_train], [d.text for d in neg_train], model_file, quality.recipe,
                [d.text for d in pos_held], [d.text for d in neg_held],
            )
            recipe = {"recipe": "DCLM fastText bigram, positives vs pool negatives", **quality.recipe.as_dict()}
            calibration_docs = neg_held
        if quality.model_path:
            classifier = _load_supplied_model(model_file, quality.hq_label, source)
        else:
            classifier = QualityClassifier(model_file, HQ_LABEL)
        calibration = _calibrate(classifier, quality, calibration_docs)
        with open(model_file, "rb") as handle:
            version = sha256_stream(handle)[0][:12]
        model_info = storage.put_file(model_file, f"{layout.CLASSIFIER_DIR}/{version}/model.bin")
    manifest = {
        "version": version, "model": f"{layout.CLASSIFIER_DIR}/{version}/model.bin", "model_sha256": model_info.sha256,
        "hq_label": classifier.hq_label, **calibration, "training": recipe,
        "metrics": None if report is None else {
            k: v for k, v in report.__dict__.items() if not k.startswith("heldout_scores")},
        "negative_sample_shards": [s.key for s in sample_from],
        "unreadable_shards": unreadable,
    }
    storage.write_json(f"{layout.CLASSIFIER_DIR}/{version}/classifier.json", manifest)
    layout.write_pointer(storage, layout.CLASSIFIER_DIR, manifest)  # what the filter reads; written last
    return dg.MaterializeResult(metadata=_classifier_metadata(manifest, report, model_info.path),
                                data_version=dg.DataVersion(version))


def _doc_id(doc: SampledDoc) -> str:
    return doc.doc_id


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
        "keep_rate_by_group": dg.MetadataValue.md(_group_table(manifest["calibration_by_group"])),
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


@dg.asset(
    partitions_def=pool_shards,
    backfill_policy=shard_batches(),
    group_name="quality",
    code_version=filtering.FILTER_VERSION,
    retry_policy=STEP_RETRY,
    deps=["pool_shard", quality_classifier],
    kinds={"parquet"},
    check_specs=[dg.AssetCheckSpec(
        "counts_reconcile", asset="filtered_pool_shard", blocking=True,
        description="in = kept + dropped + rejected, from the written files and an independent recount of "
        "the source shard's records",
    )],
    description="One pool shard scored by the quality classifier: kept documents with doc_id and score, the "
    "dropped ones for inspection, and malformed records with file, line and reason.",
)
def filtered_pool_shard(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
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
    with storage.local_copy(current["model"]) as model_path:
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
            progress=lambda p: context.log.info(
                f"{key}: {p['rows_in']:,} records in {p['seconds']} s (kept {p['kept']:,}, dropped "
                f"{p['dropped']:,}, rejected {p['rejected']:,})"),
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
        "rejected": stats["rejected"],
        "keep_rate": round(stats["kept"] / max(stats["kept"] + stats["dropped"], 1), 4),
        "threshold": stats["threshold"],
        "classifier_version": stats["classifier_version"],
        "score_histogram": dg.MetadataValue.md(plots.png_markdown(png, "score histogram")),
        "docs_per_second": stats["docs_per_second"], "mb_per_second": stats["mb_per_second"],
        "kept_path": dg.MetadataValue.path(stats["files"]["kept"]["path"]),
        "dropped_path": dg.MetadataValue.path(stats["files"]["dropped"]["path"]),
        "rejects_path": dg.MetadataValue.path(stats["files"]["rejects"]["path"]),
        "kept_sha256": stats["files"]["kept"]["sha256"],
        "source_path": dg.MetadataValue.path(stats["source_path"]),
    }
    if stats["reject_reasons"]:
        metadata["reject_reasons"] = dg.MetadataValue.json(stats["reject_reasons"])
    if stats["by_group"]:
        metadata["keep_rate_by_group"] = dg.MetadataValue.md(_group_table(stats["by_group"]))
    return metadata


@dg.asset(
    group_name="quality",
    code_version="filtered-pool-summary-v1",
    retry_policy=STEP_RETRY,
    deps=[dg.AssetDep(filtered_pool_shard, partition_mapping=dg.AllPartitionMapping())],
    kinds={"json"},
    check_specs=[dg.AssetCheckSpec(
        "all_shards_reconcile", asset="filtered_pool_summary", blocking=True,
        description="every filtered shard's in = kept + dropped + rejected, and the totals add up",
    )],
    description="The filtered pool as a whole: totals, keep rates by source, the merged score histogram, and a "
    "manifest of every shard's kept file (what later stages read).",
)
def filtered_pool_summary(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    storage = platform.storage()
    shard_stats, pool = [], set(context.instance.get_dynamic_partitions(pool_shards.name))
    filtered = [key for key in storage.list(layout.FILTERED_POOL_DIR) if not key.startswith("_")]
    gone = [key for key in filtered if key not in pool]
    if gone:  # filtered before their file left the pool (or from a pool this instance saw before)
        context.log.warning(f"{len(gone)} filtered shards are no longer in the pool; left out: {_names(gone)}")
    for key in filtered:
        if key not in pool:
            continue
        stats_path = f"{layout.FILTERED_DIR.format(key=key)}/{filtering.STATS_FILE}"
        if storage.exists(stats_path):
            shard_stats.append(storage.read_json(stats_path))
        else:
            context.log.warning(f"filtered shard {key} has no {filtering.STATS_FILE} (incomplete run?); left out")
    if not shard_stats:
        raise PermanentFailure("no filtered shards yet: materialize filtered_pool_shard partitions first")
    totals = {k: sum(s[k] for s in shard_stats) for k in ("rows_in", "kept", "dropped", "rejected")}
    unbalanced = [s["shard_key"] for s in shard_stats if s["rows_in"] != s["kept"] + s["dropped"] + s["rejected"]]
    versions = sorted({s["classifier_version"] for s in shard_stats})
    counts = np.sum([s["score_histogram"]["counts"] for s in shard_stats], axis=0).tolist()
    edges = shard_stats[0]["score_histogram"]["bin_edges"]
    by_group: dict[str, dict[str, int]] = {}
    for s in shard_stats:
        for group, c in s["by_group"].items():
            merged = by_group.setdefault(group, {"in": 0, "kept": 0})
            merged["in"] += c["in"]
            merged["kept"] += c["kept"]
    manifest = {
        "shards": [{"key": s["shard_key"], "kept": s["kept"], **s["files"]["kept"]} for s in shard_stats],
        "classifier_versions": versions, **totals,
    }
    info = storage.write_json(layout.FILTERED_MANIFEST, manifest)
    threshold = shard_stats[0]["threshold"]
    png = plots.histogram_png(edges, counts, "filtered pool: quality scores", "P(high quality)", threshold)
    passed = not unbalanced and len(versions) == 1
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": totals["kept"], **totals, "shards": len(shard_stats),
            "keep_rate": round(totals["kept"] / max(totals["kept"] + totals["dropped"], 1), 4),
            "classifier_versions": ", ".join(versions),
            "score_histogram": dg.MetadataValue.md(plots.png_markdown(png, "score histogram")
                                                   + "\n\n" + plots.histogram_table(edges, counts)),
            "keep_rate_by_group": dg.MetadataValue.md(_group_table(by_group)) if by_group else "",
            "manifest": dg.MetadataValue.path(info.path),
            "shards_no_longer_in_pool": len(gone), "left_out_shards": _names(gone),
        },
        check_results=[dg.AssetCheckResult(
            check_name="all_shards_reconcile", passed=passed, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"unbalanced_shards": ", ".join(unbalanced) or "none",
                      "classifier_versions": ", ".join(versions)},
        )],
        data_version=dg.DataVersion(info.sha256[:16]),
    )


def _names(keys: list[str], shown: int = 20) -> str:
    """Up to ``shown`` keys, then how many more: a report line must stay short at 10,000 shards."""
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "") or "none"
