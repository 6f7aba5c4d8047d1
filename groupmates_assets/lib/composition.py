"""What each selected corpus is made of: documents by source and by cluster, against the filtered pool.

``selected_corpus`` counts, shard by shard, the documents of every method (and of the whole filtered pool, as
``pool``) per (cluster, source); the report adds the shards up and shows, per method, the share of every source,
how the selection spreads over the clusters (clusters kept, dropped, effective number, distance from the pool's
spread) and the clusters on which the methods disagree most. Cluster ids come from ``cluster_assignments`` by
doc_id, so the baselines, which know nothing of clusters, are described on the same clusters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

POOL = "pool"
NO_SOURCE = "(none)"
NO_CLUSTER = -1  # a document without an assignment (should not happen: every kept document is assigned)
SCHEMA = pa.schema([("method", pa.string()), ("cluster", pa.int64()), ("source", pa.string()),
                    ("documents", pa.int64())])


def record_sources(fields: Sequence[str | None], group_field: str | None) -> list[str]:
    """The value of ``group_field`` in each record's JSON fields (NO_SOURCE when absent or not configured)."""
    if group_field is None:
        return [NO_SOURCE] * len(fields)
    out = []
    for raw in fields:
        value = json.loads(raw).get(group_field) if raw else None
        out.append(NO_SOURCE if value is None else str(value))
    return out


def shard_composition(kept: pa.Table, selections: Mapping[str, pa.Table], key: str, assignments: pa.Table,
                      group_field: str | None) -> pa.Table:
    """Documents per (method, cluster, source) of shard ``key``: every kept document as ``pool`` and every
    method's selected documents of the shard, joined by doc_id (never by row order)."""
    sources = np.array(record_sources(kept.column("fields").to_pylist(), group_field), dtype=object)
    rows = pc.fill_null(pc.index_in(kept.column("doc_id"), value_set=assignments.column("doc_id")), -1).to_numpy()
    assigned = assignments.column("cluster").to_numpy()
    clusters = np.where(rows >= 0, assigned[np.maximum(rows, 0)], NO_CLUSTER) if len(assigned) else \
        np.full(len(rows), NO_CLUSTER, dtype=np.int64)
    parts = [_count(POOL, clusters, sources)]
    for method, table in selections.items():
        mine = table.filter(pc.equal(table.column("shard"), key))
        found = pc.drop_null(pc.index_in(mine.column("doc_id"), value_set=kept.column("doc_id"))).to_numpy()
        parts.append(_count(method, clusters[found], sources[found]))
    return pa.concat_tables(parts)


def _count(method: str, clusters: np.ndarray, sources: np.ndarray) -> pa.Table:
    if not len(clusters):
        return SCHEMA.empty_table()
    documents = pa.table({"method": pa.array([method] * len(clusters), pa.string()),
                          "cluster": pa.array(clusters, pa.int64()), "source": pa.array(sources.tolist(), pa.string()),
                          "documents": pa.array(np.ones(len(clusters), dtype=np.int64))}, schema=SCHEMA)
    return total_composition([documents])


def total_composition(tables: Sequence[pa.Table]) -> pa.Table:
    """The shards' counts added up per (method, cluster, source)."""
    if not tables:
        return SCHEMA.empty_table()
    summed = pa.concat_tables(tables).group_by(["method", "cluster", "source"]).aggregate([("documents", "sum")])
    out = pa.table({"method": summed.column("method"), "cluster": summed.column("cluster"),
                    "source": summed.column("source"), "documents": summed.column("documents_sum")}, schema=SCHEMA)
    return out.sort_by([("method", "ascending"), ("cluster", "ascending"), ("source", "ascending")])


def _matrix(table: pa.Table, method: str, column: str, labels: list) -> np.ndarray:
    mine = table.filter(pc.equal(table.column("method"), method))
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros(len(labels), dtype=np.int64)
    for label, count in zip(mine.column(column).to_pylist(), mine.column("documents").to_pylist(), strict=True):
        out[index[label]] += count
    return out


def summarize(table: pa.Table, methods: Sequence[str], top_clusters: int = 10) -> dict[str, Any]:
    """Per method: documents by source (counts and shares), and the spread over clusters: clusters with any
    document, clusters of the pool dropped entirely, clusters kept at 90% or more, the effective number of
    clusters (exp of the entropy of the cluster shares), and the total variation distance from the pool's
    cluster shares. ``clusters``: the ``top_clusters`` clusters where the methods' selected shares of the cluster
    differ most, with each one's size, dominant source and share of it selected by every method."""
    sources = sorted(set(table.column("source").to_pylist()))
    clusters = sorted(set(table.column("cluster").to_pylist()))
    pool_sources, pool_clusters = _matrix(table, POOL, "source", sources), _matrix(table, POOL, "cluster", clusters)
    pool_share = pool_clusters / max(int(pool_clusters.sum()), 1)
    out: dict[str, Any] = {"sources": sources, "methods": {}, "pool": {
        "documents": int(pool_clusters.sum()), "by_source": dict(zip(sources, pool_sources.tolist(), strict=True)),
        "clusters": int((pool_clusters > 0).sum())}}
    kept_share = {}
    for method in methods:
        by_source, by_cluster = _matrix(table, method, "source", sources), _matrix(table, method, "cluster", clusters)
        total = max(int(by_cluster.sum()), 1)
        share = by_cluster / total
        with np.errstate(divide="ignore", invalid="ignore"):
            kept_share[method] = np.where(pool_clusters > 0, by_cluster / np.maximum(pool_clusters, 1), 0.0)
            entropy = -float(np.sum(np.where(share > 0, share * np.log(np.where(share > 0, share, 1)), 0.0)))
        out["methods"][method] = {
            "documents": int(by_cluster.sum()), "by_source": dict(zip(sources, by_source.tolist(), strict=True)),
            "clusters_with_documents": int((by_cluster > 0).sum()),
            "clusters_dropped": int(((by_cluster == 0) & (pool_clusters > 0)).sum()),
            "clusters_kept_90": int(((kept_share[method] >= 0.9) & (pool_clusters > 0)).sum()),
            "effective_clusters": float(np.exp(entropy)) if by_cluster.sum() else 0.0,
            "distance_from_pool": float(0.5 * np.abs(share - pool_share).sum()) if by_cluster.sum() else None,
        }
    out["clusters"] = _disagreements(table, clusters, sources, pool_clusters, kept_share, top_clusters)
    return out


def _disagreements(table: pa.Table, clusters: list[int], sources: list[str], pool_clusters: np.ndarray,
                   kept_share: dict[str, np.ndarray], count: int) -> list[dict[str, Any]]:
    if not kept_share or not clusters:
        return []
    spread = np.std(np.stack(list(kept_share.values())), axis=0)
    order = [i for i in np.argsort(-spread, kind="stable") if pool_clusters[i] > 0][:count]
    pool = table.filter(pc.equal(table.column("method"), POOL))
    rows = []
    for i in order:
        mine = pool.filter(pc.equal(pool.column("cluster"), clusters[i]))
        counts = dict(zip(mine.column("source").to_pylist(), mine.column("documents").to_pylist(), strict=True))
        top = max(sorted(counts), key=lambda s: counts[s])
        rows.append({"cluster": int(clusters[i]), "documents": int(pool_clusters[i]), "top_source": top,
                     "top_source_share": counts[top] / int(pool_clusters[i]),
                     "kept": {m: float(share[i]) for m, share in kept_share.items()}})
    return rows


def to_markdown(summary: dict[str, Any]) -> list[str]:
    """The report's composition section: documents by source (share of each corpus), the spread over clusters,
    and the clusters where the methods disagree most."""
    methods = list(summary["methods"])
    pool = summary["pool"]

    def share(counts: dict[str, int], source: str) -> str:
        total = sum(counts.values())
        return f"{100 * counts.get(source, 0) / total:.1f}%" if total else "n/a"

    lines = ["## Composition of the selected corpora", "",
             "Share of each corpus's documents by source, beside the filtered pool's:", "",
             "| source | pool | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    lines += [f"| {s} | {share(pool['by_source'], s)} | "
              + " | ".join(share(summary["methods"][m]["by_source"], s) for m in methods) + " |"
              for s in summary["sources"]]
    lines += ["", f"Spread over the {pool['clusters']:,} clusters of the pool (effective clusters: exp of the entropy "
              "of the corpus's cluster shares; distance: total variation from the pool's cluster shares, 0 = the "
              "pool's mix):", "",
              "| method | documents | clusters with documents | clusters dropped | clusters kept ≥ 90% | "
              "effective clusters | distance from the pool |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        row = summary["methods"][method]
        distance = "n/a" if row["distance_from_pool"] is None else f"{row['distance_from_pool']:.3f}"
        lines.append(f"| {method} | {row['documents']:,} | {row['clusters_with_documents']:,} | "
                     f"{row['clusters_dropped']:,} | {row['clusters_kept_90']:,} | {row['effective_clusters']:.1f} | "
                     f"{distance} |")
    if summary["clusters"]:
        lines += ["", "The clusters where the methods' selected shares differ most (share of the cluster's documents "
                  "each method selected):", "",
                  "| cluster | documents | main source | " + " | ".join(methods) + " |",
                  "|---:|---:|---|" + "---:|" * len(methods)]
        lines += [f"| {c['cluster']} | {c['documents']:,} | {c['top_source']} ({100 * c['top_source_share']:.0f}%) | "
                  + " | ".join(f"{100 * c['kept'][m]:.0f}%" for m in methods) + " |" for c in summary["clusters"]]
    return [*lines, ""]
