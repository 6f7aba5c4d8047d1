"""Report stage: Group-MATES against random, MATES and fastText-only selection at the same token budget.

The numbers come from the evaluation and pretraining outputs in storage; the cost table comes from the Dagster
instance (the wall time of the steps that produced the latest materialization of each stage), so it measures
what actually ran, on whatever machine ran it.
"""

from typing import Any

import dagster as dg

from groupmates_assets.defs.common import PermanentFailure
from groupmates_assets.defs.deployment import step_asset
from groupmates_assets.defs.partitions import SELECTION_METHODS
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import causal, composition, layout, plots
from groupmates_assets.lib import report as rp
from groupmates_assets.lib import selection as selection_registry
from groupmates_assets.lib.jsonsafe import finite
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import METHOD

# Stages whose wall time is the cost of selecting data (the paper's cost table), by component.
OVERHEAD_STAGES: dict[str, tuple[str, ...]] = {
    "oracle (probe pool, reference set, random + bootstrap trajectories)": (
        "probe_pool", "reference_set", "oracle_random", "oracle_bootstrap"),
    "influence models (initial, bootstrap search, final)": (
        "influence_model_init", "bootstrap_trajectories", "influence_model_final"),
    "pool inference and clustering": ("pool_predictions", "cluster_centroids", "cluster_assignments"),
    "group selection": ("selected_documents",),
}


def step_seconds(instance: dg.DagsterInstance, asset: str) -> tuple[float, int]:
    """(wall seconds, partitions) of the steps that produced the latest materialization of each partition."""
    latest: dict[str | None, tuple[str, str | None]] = {}
    cursor = None
    while True:  # newest first, a page at a time (the instance caps one fetch)
        page = instance.fetch_materializations(dg.AssetKey(asset), limit=1000, cursor=cursor)
        for record in page.records:
            latest.setdefault(record.partition_key, (record.run_id, record.event_log_entry.step_key))
        if not page.has_more:
            break
        cursor = page.cursor
    seconds = 0.0
    for run_id, step_key in latest.values():
        for stats in instance.get_run_step_stats(run_id, step_keys=[step_key] if step_key else None):
            if stats.start_time and stats.end_time:
                seconds += stats.end_time - stats.start_time
    return seconds, len(latest)


def cost_table(instance: dg.DagsterInstance, stages: int, seeds: int) -> list[dict[str, Any]]:
    """Selection overhead against one Group-MATES pretraining run (stage 1 + one seed of stage 2 when S = 2)."""
    rows = [{"component": name, "seconds": sum(step_seconds(instance, a)[0] for a in assets), "kind": "selection"}
            for name, assets in OVERHEAD_STAGES.items()]
    probe = step_seconds(instance, "probe_checkpoint")[0]
    stage2 = step_seconds_partition(instance, "pretrain_checkpoints", "group_mates") / max(seeds, 1)
    if stages == 2:
        rows += [{"component": "pretraining stage 1 (filtered pool, to the probe checkpoint)", "seconds": probe,
                  "kind": "pretraining"},
                 {"component": "pretraining stage 2 (selected data, one seed)", "seconds": stage2,
                  "kind": "pretraining"}]
    else:
        rows += [{"component": "probe LM (filtered pool)", "seconds": probe, "kind": "selection"},
                 {"component": "pretraining on selected data (one seed)", "seconds": stage2, "kind": "pretraining"}]
    total = sum(r["seconds"] for r in rows) or 1.0
    return [{**r, "share": r["seconds"] / total} for r in rows]


def step_seconds_partition(instance: dg.DagsterInstance, asset: str, partition: str) -> float:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    if not records:
        return 0.0
    record = records[0]
    return sum(s.end_time - s.start_time for s in instance.get_run_step_stats(
        record.run_id, step_keys=[record.event_log_entry.step_key]) if s.start_time and s.end_time)


@step_asset(
    group_name="report",
    code_version="selection-report-v3",
    deps=[dg.AssetDep("evaluation", partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep("pretrain_checkpoints", partition_mapping=dg.AllPartitionMapping()), "selection_influence"],
    kinds={"markdown"},
)
def selection_report(context: dg.AssetExecutionContext, platform: PlatformResource) -> dg.MaterializeResult:
    """Group-MATES against random, MATES and fastText-only selection at equal tokens: the evaluation table (mean and
    spread over seeds), each method's paired difference from random with its 95% interval at every checkpoint and
    the verdict it supports, per-task scores, loss and score-vs-tokens curves, the tokens each method needs to reach
    random selection's final score, and the selection overhead against pretraining time. Markdown with images here
    and under report/ in the storage root."""
    storage, settings = platform.storage(), platform.settings()
    evaluations, curves, corpora = _report_inputs(storage)
    costs = cost_table(context.instance, settings.pretrain.stages, settings.pretrain.seeds)
    report = rp.build_report(evaluations, curves, corpora, costs, baseline="random", focus="group_mates",
                             spec=METHOD.intervals(), descriptions=_descriptions(),
                             composition=composition.summarize(_composition(storage), SELECTION_METHODS))
    pngs = rp.figures(report)
    causal_section = "\n\n## Causal check\n\n" + causal.to_markdown(
        storage.read_json(layout.current_causal(storage)["path"]))
    markdown = rp.to_markdown(report, settings.name, {name: name for name in pngs}) + causal_section
    for name, png in pngs.items():
        storage.write_bytes(f"{layout.REPORT_DIR}/{name}", png)
    storage.write_json(f"{layout.REPORT_DIR}/report.json", report)
    info = storage.write_bytes(f"{layout.REPORT_DIR}/selection_report.md", markdown.encode())
    inline = rp.to_markdown(report, settings.name, {name: plots.png_markdown(png, name)
                                                    for name, png in pngs.items()}, inline=True) + causal_section
    context.log.info("\n" + rp.headline_markdown(report))
    focus = report["methods"]["group_mates"]
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(inline),
        "headline": dg.MetadataValue.md(rp.headline_markdown(report)),
        "group_mates_core_centered": focus["core_centered"]["mean"],
        "random_core_centered": report["methods"]["random"]["core_centered"]["mean"],
        "group_mates_bits_per_byte": focus["bits_per_byte"]["mean"],
        "random_bits_per_byte": report["methods"]["random"]["bits_per_byte"]["mean"],
        **{key: finite(value) for key, value in rp.report_metadata(report).items()},
        "verdict": dg.MetadataValue.md("\n".join(f"- {line}" for line in report["verdict"])),
        "intervals": report["intervals"],
        "selection_overhead_share": round(report["overhead_share"], 4),
        "seeds": settings.pretrain.seeds, "stages": settings.pretrain.stages,
        "path": dg.MetadataValue.path(info.path),
    })


def _descriptions() -> dict[str, str]:
    return {name: method.description for name, method in selection_registry.SELECTION_METHODS.items()}


def _composition(storage: Storage):
    """Every shard's documents by method, cluster and source (written by selected_corpus), added up."""
    paths = {key: layout.SELECTED_COMPOSITION.format(key=key) for key in layout.filtered_shards(storage)}
    missing = [key for key, path in paths.items() if not storage.exists(path)]
    if missing:
        raise PermanentFailure(f"no corpus composition for shards {', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}: rematerialize selected_corpus")
    return composition.total_composition([storage.read_parquet(p) for p in paths.values()])


def _report_inputs(storage: Storage) -> tuple[dict[str, dict], dict[str, list[list[dict]]], dict[str, dict]]:
    """(evaluations, training-loss curves per seed, corpus manifests) of every method, read from storage."""
    missing = [m for m in SELECTION_METHODS if not storage.exists(f"{layout.EVALUATION_DIR}/{m}.json")]
    if missing:
        raise PermanentFailure(f"no evaluation for {', '.join(missing)}: materialize evaluation for every method first")
    evaluations = {m: storage.read_json(f"{layout.EVALUATION_DIR}/{m}.json") for m in SELECTION_METHODS}
    curves = {m: [storage.read_json(f"{run['path']}/curve.json")
                  for run in layout.current_pretrain(storage, m)["runs"]] for m in SELECTION_METHODS}
    corpora = {}
    for method in SELECTION_METHODS:
        current = layout.current_corpus(storage, method)
        corpora[method] = storage.read_json(f"{current['path']}/manifest.json")
    return evaluations, curves, corpora
