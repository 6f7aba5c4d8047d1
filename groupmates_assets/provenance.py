"""`groupmates provenance`: the chain of upstream assets that produced a selected dataset, read from the instance.

The Dagster UI shows one asset at a time; a reviewer who asks "which classifier, probe checkpoint, oracle labels,
influence models and clusters produced this corpus, in which runs, at which code versions?" needs the whole
upstream closure at once. This walks the asset graph of the code location upstream from one asset and, for every
ancestor, reads the latest materialization records from the instance: code version of the definition and the one
recorded at materialization, data version, run ids and times, partition counts, and a short list of the method
parameters each stage records in its metadata. It also reads the input event pointers Dagster stores on every
materialization, so it can say which inputs were rematerialized after an asset was built from them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dagster as dg

from groupmates_assets.lib.selection import SELECTION_METHODS

DATA_VERSION_TAG = "dagster/data_version"
CODE_VERSION_TAG = "dagster/code_version"
INPUT_POINTER_PREFIX = "dagster/input_event_pointer/"
PAGE = 1000  # records per fetch_materializations call; SQL storages cap a page at 10,000
SHOWN_RUNS = 3  # run ids printed per partitioned asset in the table (the JSON has them all)

# The asset that holds each selection method's choice: the other methods' are pruned from a method's lineage.
METHOD_SELECTION_ASSETS = {name: method.asset for name, method in SELECTION_METHODS.items()}

# Metadata worth reading per asset: the method parameters and fingerprints that identify what was built.
# A dotted key reads inside a JSON value; ``{method}`` is the selection method traced.
_ORACLE = ["fingerprint", "checkpoint_sha256", "reference_sha256", "trajectories"]
_MODEL = ["fingerprint", "alpha", "tau", "val_spearman", "beats_constant_predictor", "oracle_fingerprints",
          "encoder", "weights_sha256"]
PARAMETERS: dict[str, list[str]] = {
    "embedded_pool": ["dagster/row_count", "shards", "positives"],
    "pool_shard": ["format", "bytes", "sha256"],
    "quality_classifier": ["classifier_version", "threshold", "threshold_rule", "calibration_keep_rate",
                           "heldout_auc", "model_sha256"],
    "filtered_pool_shard": ["classifier_version", "threshold", "kept", "heldout", "keep_rate", "kept_sha256"],
    "filtered_pool_summary": ["rows_in", "kept", "heldout", "keep_rate", "classifier_versions"],
    "tokenized_pool_shard": ["tokens", "contexts", "tokenizer_sha256"],
    "probe_checkpoint": ["checkpoint_version", "step", "total_steps", "final_loss", "model_sha256"],
    "reference_set": ["examples", "sha256"],
    "probe_pool": ["contexts", "tokens_sha256"],
    "oracle_random": _ORACLE,
    "influence_model_init": _MODEL,
    "bootstrap_trajectories": ["fingerprint", "model_fingerprint", "width", "length", "per_tail"],
    "oracle_bootstrap": _ORACLE,
    "influence_model_final": _MODEL,
    "individual_influence_model": _MODEL,
    "influence_model_report": ["final_spearman_random_heldout", "individual_spearman_random_heldout",
                               "init_spearman_random_heldout"],
    "pool_predictions": ["models_fingerprint", "documents"],
    "cluster_centroids": ["fingerprint", "clusters", "iterations", "seed"],
    "cluster_assignments": ["clusters_fingerprint"],
    "selected_documents": ["ratio", "budget_rounding", "learned_alpha_tau", "alpha", "tau", "cluster_range",
                           "selected"],
    "selected_random": ["budget", "selected", "score"],
    "selected_mates": ["budget", "selected", "score"],
    "selected_fasttext": ["budget", "selected", "score"],
    "selected_weighted": ["policy", "budget", "selected", "budget_floor", "budget_cap", "weighted_sharpness",
                          "clusters_below_uniform"],
    "selected_global": ["policy", "budget", "selected", "budget_floor", "budget_cap", "clusters_below_uniform"],
    "selected_corpus": ["selected_{method}", "kept_documents", "sha256.{method}", "selection_settings.ratio",
                        "selection_settings.budget_rounding", "lineage.clusters.fingerprint"],
    "tokenized_corpus": ["fingerprint", "documents", "tokens", "token_budget", "passes", "seeds"],
    "pretrain_checkpoints": ["fingerprint", "stages", "seeds", "final_step", "final_loss_mean"],
    "evaluation": ["core_centered", "bits_per_byte", "seeds", "step"],
    "selection_report": ["group_mates_core_centered", "random_core_centered", "selection_overhead_share"],
}
FALLBACK_KEYS = 8  # an asset without a list: its first few short scalar metadata values


@dataclass
class Materialization:
    """One materialization record, reduced to what lineage needs."""

    run_id: str
    timestamp: float
    storage_id: int
    partition: str | None
    data_version: str | None
    code_version: str | None
    parameters: dict[str, Any]
    input_pointers: dict[str, int | None]  # parent asset -> storage id of the parent materialization it read

    @property
    def time(self) -> str:
        return dt.datetime.fromtimestamp(self.timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class AssetProvenance:
    """An asset of the chain: its definition and its latest materialization(s) in the instance."""

    key: str
    group: str | None
    code_version: str | None  # of the definition loaded now
    level: int  # longest path to the traced asset (0: the asset itself): an input's level exceeds its consumers'
    parents: list[str]
    partitioned: bool
    partitions_total: int | None = None
    partitions_materialized: int = 0
    partition: str | None = None  # the partition shown, when the chain pins one (identity-mapped from the target)
    latest: Materialization | None = None  # of ``partition`` if set, else the newest of any partition
    latest_run_ids: list[str] = field(default_factory=list)  # runs of each partition's latest, newest first
    recorded_code_versions: list[str] = field(default_factory=list)
    inputs_changed_since: list[str] = field(default_factory=list)  # parents rematerialized after ``latest`` read them
    consumed: dict[str, dict[str, Any]] = field(default_factory=dict)  # parent -> the record ``latest`` read

    @property
    def code_version_matches(self) -> bool:
        """Without a code version in the definition Dagster records the run id: nothing to compare."""
        return self.code_version is None or all(v == self.code_version for v in self.recorded_code_versions)


@dataclass
class Provenance:
    target: str
    partition: str | None
    method: str | None
    assets: list[AssetProvenance]
    pruned: list[str]  # other methods' selection assets left out of this method's lineage

    def to_json(self) -> dict[str, Any]:
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, unknown objects their string."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------- reading


def fetch_all(instance: dg.DagsterInstance, records_filter: dg.AssetKey | dg.AssetRecordsFilter,
              limit: int | None = None) -> list[dg.EventLogRecord]:
    """Every materialization record matching ``records_filter`` (newest first), page by page: the instance caps
    one call's limit."""
    records: list[dg.EventLogRecord] = []
    cursor = None
    while limit is None or len(records) < limit:
        page = min(PAGE, limit - len(records)) if limit is not None else PAGE
        result = instance.fetch_materializations(records_filter, limit=page, cursor=cursor)
        records.extend(result.records)
        if not result.has_more or not result.records:
            break
        cursor = result.cursor
    return records


def _metadata_value(value: Any) -> Any:
    return value.value if isinstance(value, dg.MetadataValue) else value


def read_parameters(asset: str, metadata: Mapping[str, Any], method: str | None,
                    parameters: Mapping[str, Sequence[str]] = PARAMETERS) -> dict[str, Any]:
    """The whitelisted metadata of one materialization as plain values; missing keys are left out."""
    if asset not in parameters:
        out = {}
        for key, raw in metadata.items():
            value = _metadata_value(raw)
            if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 64
                                                          and not isinstance(raw, dg.PathMetadataValue)):
                out[key] = value
            if len(out) == FALLBACK_KEYS:
                break
        return out
    out = {}
    for spec in parameters[asset]:
        name = spec.format(method=method or "group_mates")
        head, *path = name.split(".")
        if head not in metadata:
            continue
        value = _metadata_value(metadata[head])
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            out[name] = value
    return out


def _materialization(record: dg.EventLogRecord, asset: str, method: str | None,
                     parameters: Mapping[str, Sequence[str]]) -> Materialization:
    event = record.asset_materialization
    tags = dict(event.tags or {}) if event else {}
    pointers = {k[len(INPUT_POINTER_PREFIX):]: (int(v) if v.isdigit() else None)
                for k, v in tags.items() if k.startswith(INPUT_POINTER_PREFIX)}
    return Materialization(
        run_id=record.run_id, timestamp=record.timestamp, storage_id=record.storage_id,
        partition=record.partition_key, data_version=tags.get(DATA_VERSION_TAG),
        code_version=tags.get(CODE_VERSION_TAG),
        parameters=read_parameters(asset, event.metadata if event else {}, method, parameters),
        input_pointers=pointers,
    )


def latest_by_partition(instance: dg.DagsterInstance, key: dg.AssetKey) -> list[dg.EventLogRecord]:
    """The latest materialization record of every materialized partition of ``key``, newest first."""
    latest = instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION)
    ids = sorted(latest.values())
    records: list[dg.EventLogRecord] = []
    for start in range(0, len(ids), PAGE):
        records += fetch_all(instance, dg.AssetRecordsFilter(asset_key=key, storage_ids=ids[start:start + PAGE]))
    return sorted(records, key=lambda r: r.storage_id, reverse=True)


# ----------------------------------------------------------------------------------------------- tracing


def upstream(asset_graph: Any, target: dg.AssetKey, pruned: Iterable[str] = ()) -> dict[dg.AssetKey, int]:
    """Every ancestor of ``target`` (and itself), leaving out ``pruned``, with its level: the longest path from it
    to ``target``, so sorting by level lists every input before what consumes it."""
    skip = {dg.AssetKey(name) for name in pruned} - {target}
    level = {target: 0}
    frontier = [target]
    while frontier:  # longest paths in a DAG: push a level up to the inputs until nothing moves
        following = []
        for key in frontier:
            for parent in sorted(asset_graph.get(key).parent_keys):
                if parent in skip or not asset_graph.has(parent) or level.get(parent, -1) > level[key]:
                    continue
                level[parent] = level[key] + 1
                following.append(parent)
        frontier = following
    return level


def pinned_partitions(asset_graph: Any, chain: Mapping[dg.AssetKey, int], target: dg.AssetKey,
                      partition: str | None) -> dict[dg.AssetKey, str]:
    """Partitions that follow from the target's through identity partition mappings (a shard's corpus comes
    from that shard's filtered pool, which comes from that shard's file); an asset reached with two different
    keys is not pinned."""
    if partition is None:
        return {}
    pinned: dict[dg.AssetKey, str | None] = {target: partition}
    for key in sorted(chain, key=lambda k: chain[k]):  # consumers before their inputs
        mine = pinned.get(key)
        if mine is None:
            continue
        for parent in asset_graph.get(key).parent_keys:
            if parent not in chain or not asset_graph.get(parent).is_partitioned:
                continue
            mapping = asset_graph.get_partition_mapping(key, parent)
            if isinstance(mapping, dg.IdentityPartitionMapping):
                pinned[parent] = mine if pinned.get(parent, mine) == mine else None
    return {k: v for k, v in pinned.items() if v is not None}


def trace(instance: dg.DagsterInstance, asset_graph: Any, asset: str, partition: str | None = None,
          method: str | None = "group_mates",
          parameters: Mapping[str, Sequence[str]] = PARAMETERS) -> Provenance:
    """The provenance of ``asset`` (one ``partition`` of it, or all): its upstream closure in ``asset_graph``
    with what ``instance`` recorded for each. ``method`` prunes the other selection methods' assets; None keeps
    every ancestor."""
    target = dg.AssetKey.from_user_string(asset)
    if not asset_graph.has(target):
        raise ValueError(f"no asset {asset!r} in the code location")
    node = asset_graph.get(target)
    if method is not None and method not in METHOD_SELECTION_ASSETS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHOD_SELECTION_ASSETS)}")
    if method is not None and asset in METHOD_SELECTION_ASSETS.values():
        method = next(m for m, a in METHOD_SELECTION_ASSETS.items() if a == asset)  # the asset names its method
    if node.is_partitioned:
        keys = node.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        if partition is None and method in keys:
            partition = method  # the method-partitioned stages: tokenized corpus, pretraining, evaluation
        if partition is not None and partition not in keys:
            raise ValueError(f"{asset} has no partition {partition!r}")
    elif partition is not None:
        raise ValueError(f"{asset} is not partitioned")
    pruned = [a for m, a in METHOD_SELECTION_ASSETS.items() if method is not None and m != method]
    if method is not None and asset_graph.has(dg.AssetKey(METHOD_SELECTION_ASSETS[method])):
        # a budget policy's selection is cut from Group-MATES' greedy sequences: keep what the method reads
        own = upstream(asset_graph, dg.AssetKey(METHOD_SELECTION_ASSETS[method]))
        pruned = [a for a in pruned if dg.AssetKey(a) not in own]
    chain = upstream(asset_graph, target, pruned)
    pinned = pinned_partitions(asset_graph, chain, target, partition)
    assets, latest_ids = [], {}
    for key in sorted(chain, key=lambda k: (-chain[k], k.to_user_string())):
        shown, latest_ids[key] = _asset_provenance(instance, asset_graph, key, chain, pinned.get(key), method,
                                                   parameters)
        assets.append(shown)
    _link_inputs(instance, asset_graph, assets, latest_ids)
    present = {key.to_user_string() for key in chain}
    return Provenance(target=asset, partition=partition, method=method, assets=assets,
                      pruned=[a for a in pruned if asset_graph.has(dg.AssetKey(a)) and a not in present])


def _asset_provenance(instance: dg.DagsterInstance, asset_graph: Any, key: dg.AssetKey,
                      chain: Mapping[dg.AssetKey, int], partition: str | None, method: str | None,
                      parameters: Mapping[str, Sequence[str]]) -> tuple[AssetProvenance, dict[str | None, int]]:
    """One asset of the chain, and the storage id of its latest materialization per partition (None: unpartitioned)."""
    node = asset_graph.get(key)
    name = key.to_user_string()
    out = AssetProvenance(key=name, group=node.group_name, code_version=node.code_version, level=chain[key],
                          parents=sorted(p.to_user_string() for p in node.parent_keys if p in chain),
                          partitioned=node.is_partitioned, partition=partition)
    if node.is_partitioned:
        keys = set(node.partitions_def.get_partition_keys(dynamic_partitions_store=instance))
        out.partitions_total = len(keys)
        records = [r for r in latest_by_partition(instance, key) if r.partition_key in keys]  # not deleted ones
        out.partitions_materialized = len(records)
        out.latest_run_ids = list(dict.fromkeys(r.run_id for r in records))
        chosen = [r for r in records if r.partition_key == partition] if partition else records[:1]
    else:
        chosen = fetch_all(instance, key, limit=1)
        records = chosen
    if chosen:
        out.latest = _materialization(chosen[0], name, method, parameters)
        if not node.is_partitioned:
            out.latest_run_ids = [out.latest.run_id]
    out.recorded_code_versions = sorted({v for r in records
                                         if (v := (r.asset_materialization.tags or {}).get(CODE_VERSION_TAG))})
    return out, {r.partition_key: r.storage_id for r in records}


def _link_inputs(instance: dg.DagsterInstance, asset_graph: Any, assets: list[AssetProvenance],
                 latest_ids: Mapping[dg.AssetKey, Mapping[str | None, int]]) -> None:
    """For each shown materialization: the parent record it read (Dagster's input event pointer: the parent's
    latest materialization, of any partition, when the run started), and the parents materialized since in a
    partition it depends on (the same one through an identity mapping, any one otherwise)."""
    for asset in assets:
        if asset.latest is None:
            continue
        child = dg.AssetKey.from_user_string(asset.key)
        for parent in asset.parents:
            pointer = asset.latest.input_pointers.get(parent)
            if pointer is None:
                continue
            parent_key = dg.AssetKey.from_user_string(parent)
            records = fetch_all(instance, dg.AssetRecordsFilter(asset_key=parent_key, storage_ids=[pointer]))
            asset.consumed[parent] = {"storage_id": pointer, "run_id": records[0].run_id if records else None,
                                      "partition": records[0].partition_key if records else None}
            ids = latest_ids.get(parent_key, {})
            same_partition = (asset.latest.partition is not None and asset_graph.get(parent_key).is_partitioned
                              and isinstance(asset_graph.get_partition_mapping(child, parent_key),
                                             dg.IdentityPartitionMapping))
            relevant = [ids.get(asset.latest.partition, 0)] if same_partition else list(ids.values())
            if max(relevant, default=0) > pointer:
                asset.inputs_changed_since.append(parent)


# ----------------------------------------------------------------------------------------------- output


def _short(value: Any, width: int = 40) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict | list):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    else:
        text = str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def render_table(provenance: Provenance, home: str | None = None) -> str:
    """A table of the chain (one row per asset, inputs before their consumers) and each asset's parameters."""
    scope = f"partition {provenance.partition}" if provenance.partition else "all partitions"
    lines = [f"Provenance of {provenance.target} ({scope}"
             + (f", method {provenance.method})" if provenance.method else ")")
             + (f" from the instance in {home}" if home else "")]
    if provenance.pruned:
        lines.append(f"(other methods' selections left out: {', '.join(provenance.pruned)}; --all-methods shows them)")
    header = ["asset", "group", "code version (definition / recorded if other)", "data version", "partitions",
              "latest run(s)", "materialized (UTC)"]
    rows = [header]
    for a in provenance.assets:
        recorded = ", ".join(a.recorded_code_versions) or "-"
        code = (a.code_version or "-") + ("" if a.code_version_matches else f" / {recorded} (!)")
        if a.partitioned:
            parts = f"{a.partitions_materialized}/{a.partitions_total}"
            if a.partition:
                parts += f" [{a.partition}]"
        else:
            parts = "-"
        if a.latest is None:
            runs, when, data = "not materialized", "-", "-"
        else:
            shown = [a.latest.run_id] if a.partition else a.latest_run_ids
            runs = ", ".join(r[:8] for r in shown[:SHOWN_RUNS]) + (
                f" +{len(shown) - SHOWN_RUNS}" if len(shown) > SHOWN_RUNS else "")
            when = a.latest.time + (" (!)" if a.inputs_changed_since else "")
            data = a.latest.data_version or "-"
        rows.append([a.key, a.group or "-", code, _short(data, 18), parts, runs, when])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "Inputs and the parameters recorded at materialization:"]
    for a in provenance.assets:
        shown = f" [latest: {a.latest.partition}]" if a.latest and a.latest.partition and not a.partition else ""
        lines.append(f"  {a.key}{shown}" + (f"  <- {', '.join(a.parents)}" if a.parents else "  (no inputs)"))
        params = "; ".join(f"{k}={_short(v)}" for k, v in (a.latest.parameters if a.latest else {}).items())
        if params:
            lines.append(f"    {params}")
        if a.inputs_changed_since:
            lines.append(f"    (!) rematerialized after this was built from them: {', '.join(a.inputs_changed_since)}")
    if any(not a.code_version_matches for a in provenance.assets):
        lines.append("(!) code version: materialized with another code version than the definition loaded now")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- command


def command(args: argparse.Namespace, instance: dg.DagsterInstance | None = None, asset_graph: Any = None,
            home: str | None = None) -> int:
    """Print the provenance of ``args.asset``; 2 with a message when the asset, partition or method is unknown."""
    if asset_graph is None:
        from groupmates_assets.definitions import build_definitions

        asset_graph = build_definitions().resolve_asset_graph()
    if instance is None:
        with dg.DagsterInstance.get() as owned:
            return command(args, owned, asset_graph, home)
    try:
        result = trace(instance, asset_graph, args.asset, args.partition, None if args.all_methods else args.method)
    except ValueError as error:
        print(f"groupmates provenance: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2) if args.json else render_table(result, home), flush=True)
    return 0
