"""The selection stage at growing pool sizes on the CPU: time, peak memory and bytes read per stage and size.

For each N of ``BENCH_SCALE_SIZES`` (default 0.25M, 0.5M, 1M and 2M documents of 384 dimensions, in 64 to 256
shards of about 7,800) the benchmark writes what the stages before selection write, from random unit vectors with
a planted cluster structure and no encoder run: the filtered pool (``kept.parquet``: doc_id, line, text,
quality_score, fields), the pool predictions (h in float16, u, u_individual, text_hash, under the models'
fingerprint) and the influence-model pointers. Then the real assets run through Dagster on that layout, every run
in a fresh process of its own as the run launcher starts them (in-process executor, a SQLite instance):
``cluster_centroids``, ``cluster_assignments`` (runs of 32 shards, as a backfill of ``pool.shards_per_run`` 32
launches them), every ``selected_documents`` range partition, the two budget policies (``selected_weighted``,
``selected_global``), the three baselines and ``selected_corpus`` (runs of 32 shards). One range partition
selects the same number of documents at every N (``DOCS_PER_RANGE``: ``cluster_ranges = N / 50,000``). Two ways
to grow the pool, because no choice of k keeps every stage linear:

- fixed mean cluster size (the default; the profiles' ``selection.mean_cluster_size``): clusters of about
  ``CLUSTER_SIZE`` documents, ``k = N / CLUSTER_SIZE``. The greedy's cost per document follows the cluster size,
  so ``selected_documents`` stays linear, but exact assignment is O(N k d) and k-means training O(k^2 d) (its
  sample is ``max_points_per_centroid x k``): with k proportional to N both grow as N^2, about 4x for a doubling.
- fixed k (``BENCH_SCALE_CLUSTERS``, e.g. the paper's 10,000 centroids for any pool): assignment is linear and
  training constant (apart from reading the pool for its sample), but clusters grow with N, and the greedy is
  O(|C|^2 d) per cluster, so ``selected_documents`` grows as N^2 / k.

Each ratio row says which growth the mode predicts for its stage next to the 2.2 goal.

Per stage and N: the wall time of its runs' steps (Dagster's STEP_START to STEP_SUCCESS, summed over the runs),
the peak RSS of the largest run's process (VmHWM) and how much of it the run added (above the process's RSS when
the run started: imports and the instance come first), and the bytes the runs' processes read (``rchar``: every
read system call, page cache or not). Printed as a table, written with every run's figures to
``bench/results/scale.json`` and drawn log-log in ``bench/results/scale.png``. Figures: time(2M) / time(1M) per
stage (goal at most 2.2) and the peak RSS of one ``selected_documents`` partition at the largest N against 0.5M
(goal within 1.2x).

Knobs: ``BENCH_SCALE_SIZES`` (comma list), ``BENCH_SCALE_DIR`` (where the pools are written; default a temporary
folder; each N takes about 1.8 KB per document and is deleted once measured unless ``BENCH_SCALE_KEEP=1``),
``BENCH_SCALE_SHARDS`` (shards at every N instead of N / 7,812 between 64 and 256), ``BENCH_SCALE_CLUSTERS``
(a fixed k at every N; results then go to ``scale-k<k>.json``/``.png``), ``BENCH_SCALE_STAGES``
(a comma list: only these stages, e.g. ``cluster_centroids,cluster_assignments,selected_documents``).
Run: ``python -m bench.run --only scale`` (about half an hour on 2 cores at the default sizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench.run import Figure

DIM = 384
CLUSTER_SIZE = 1_000  # selection.mean_cluster_size: documents per cluster
CLUSTERS_PER_RANGE = 50  # clusters per selected_documents partition at the default cluster size
DOCS_PER_RANGE = CLUSTER_SIZE * CLUSTERS_PER_RANGE  # documents per selected_documents partition, at every N
DOCS_PER_SHARD = 7_812.5
SHARDS_PER_RUN = 32
SIZES = (250_000, 500_000, 1_000_000, 2_000_000)
PROFILE = "bench-scale"
MODELS = {"final": "bench-final", "individual": "bench-individual"}
STAGES = ("cluster_centroids", "cluster_assignments", "selected_documents", "selected_weighted", "selected_global",
          "selected_random", "selected_mates", "selected_fasttext", "selected_corpus")
POLICIES_AND_BASELINES = ("selected_weighted", "selected_global", "selected_random", "selected_mates",
                          "selected_fasttext")
RESULTS = Path("bench/results")


def _say(message: str) -> None:
    print(f"[bench scale] {message}", file=sys.stderr, flush=True)


def shards_for(documents: int) -> int:
    override = os.environ.get("BENCH_SCALE_SHARDS")
    return int(override) if override else max(64, min(256, round(documents / DOCS_PER_SHARD)))


def fixed_clusters() -> int | None:
    """``BENCH_SCALE_CLUSTERS``: k at every N, or None for k = N / CLUSTER_SIZE."""
    value = os.environ.get("BENCH_SCALE_CLUSTERS")
    return int(value) if value else None


def profile_settings(documents: int) -> dict[str, Any]:
    """The selection settings at ``documents``: the method's shape, scaled (see the module docstring)."""
    k = fixed_clusters() or -(-documents // CLUSTER_SIZE)
    return {"mean_cluster_size": -(-documents // k), "kmeans_iterations": 10, "max_points_per_centroid": 40,
            "cluster_ranges": max(1, min(k, documents // DOCS_PER_RANGE)), "torch_threads": 2}


# stage -> (growth for a doubling at fixed mean cluster size, at fixed k), from the cost of each stage's work
EXPECTED_GROWTH = {
    "cluster_centroids": ("up to 4x: k grows with N, training O(k^2 d)", "~1x plus reading the pool: k fixed"),
    "cluster_assignments": ("up to 4x: k grows with N, exact assignment O(N k d)", "~2x: O(N k d), k fixed"),
    "selected_documents": ("~2x: the greedy O(N |C| d), |C| fixed; each partition also opens every shard",
                           "up to 4x as the greedy dominates: |C| = N / k grows, O(N |C| d)"),
}


def expected_growth(stage: str) -> str:
    return EXPECTED_GROWTH.get(stage, ("~2x: streamed", "~2x: streamed"))[fixed_clusters() is not None]


def results_stem() -> str:
    return f"scale-k{fixed_clusters()}" if fixed_clusters() else "scale"


# --------------------------------------------------------------------------------------------------- the pool


def write_pool(root: Path, documents: int, shards: int, seed: int = 0) -> dict[str, Any]:
    """The filtered pool, its manifest, the model pointers and the pool predictions of ``documents`` synthetic
    documents: h = the unit vector of (a planted centre + Gaussian noise), u lower in some clusters than others
    and varying inside each, u_individual = u + noise, quality_score uniform. Real doc_ids (shard, line, text
    hash) and text hashes, so every join and the T17 check run as on real data."""
    from groupmates_assets.lib import layout
    from groupmates_assets.lib.shards import make_doc_id, text_hash
    from groupmates_assets.lib.storage import Storage

    storage = Storage(str(root))
    rng = np.random.default_rng(seed)
    topics = -(-documents // CLUSTER_SIZE)
    centres = rng.standard_normal((topics, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic_u = rng.normal(0.0, 0.004, size=topics).astype(np.float32)
    models_fp = layout.fingerprint(**MODELS)
    for kind, fingerprint in MODELS.items():
        storage.write_json(f"{layout.model_dir(kind)}/current.json", {
            "fingerprint": fingerprint, "path": f"{layout.model_dir(kind)}/{fingerprint}", "alpha": 1.0, "tau": 1.0})
    storage.write_json(layout.CURRENT_CLASSIFIER, {"version": "bench-scale"})
    sizes = np.diff(np.linspace(0, documents, shards + 1).round().astype(np.int64))
    entries, predictions_bytes, kept_bytes = [], 0, 0
    for index, count in enumerate(sizes):
        key = f"web-{index:04d}"
        topic = rng.integers(topics, size=count)
        h = centres[topic] + rng.standard_normal((count, DIM), dtype=np.float32) * (1.2 / np.sqrt(DIM))
        h /= np.linalg.norm(h, axis=1, keepdims=True)
        u = (-0.01 + topic_u[topic] + rng.normal(0.0, 0.002, size=count)).astype(np.float32)
        texts = [f"Synthetic document {i} of shard {key} on topic {t}." for i, t in enumerate(topic.tolist())]
        doc_ids = [make_doc_id(key, i + 1, text) for i, text in enumerate(texts)]
        kept = pa.table({
            "doc_id": pa.array(doc_ids, pa.string()), "line": pa.array(np.arange(1, count + 1), pa.int64()),
            "text": pa.array(texts, pa.large_string()),
            "quality_score": pa.array(rng.uniform(size=count).astype(np.float32), pa.float32()),
            "fields": pa.array([f'{{"url": "https://example.org/{key}/{i}"}}' for i in range(count)], pa.string())})
        info = storage.write_parquet(f"{layout.FILTERED_DIR.format(key=key)}/kept.parquet", kept)
        entries.append({"key": key, "kept": int(count), "path": info.path, "sha256": info.sha256})
        kept_bytes += info.bytes
        table = pa.table({
            "doc_id": kept.column("doc_id"),
            "h": pa.FixedSizeListArray.from_arrays(pa.array(h.astype(np.float16).reshape(-1)), DIM),
            "u": pa.array(u, pa.float32()),
            "u_individual": pa.array(u + rng.normal(0.0, 0.002, size=count).astype(np.float32), pa.float32()),
            "text_hash": pa.array([text_hash(t) for t in texts], pa.string())})
        predictions_bytes += storage.write_parquet(f"{layout.PREDICTIONS_DIR}/{models_fp}/{key}.parquet",
                                                   table).bytes
    storage.write_json(layout.FILTERED_MANIFEST, {"shards": entries, "classifier_versions": ["bench-scale"]})
    return {"keys": [e["key"] for e in entries], "predictions_bytes": predictions_bytes, "kept_bytes": kept_bytes}


# ---------------------------------------------------------------------------------------------------- one run


def _proc(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    """Numeric fields of /proc/self/status (kB) or /proc/self/io (bytes)."""
    out = {}
    with open(path, encoding="ascii") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in fields:
                out[name] = int(value.split()[0])
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One Dagster run in this (fresh) process; its time, memory and reads. Called with ``--child``."""
    from groupmates_assets import settings

    base = settings.get_profile("demo")
    settings.PROFILES[PROFILE] = dataclasses.replace(
        base, name=PROFILE, description="the scale benchmark",
        pool=dataclasses.replace(base.pool, shards_per_run=SHARDS_PER_RUN),
        selection=settings.SelectionProfile(**spec["selection"]))
    os.environ["GROUPMATES_PROFILE"] = PROFILE
    import dagster as dg

    from groupmates_assets.defs.partitions import pool_shards
    from groupmates_assets.defs.resources import PlatformResource
    from groupmates_assets.defs.selection import assets as sa

    assets = [sa.pool_predictions, sa.cluster_centroids, sa.cluster_assignments, sa.selected_documents,
              sa.selected_weighted, sa.selected_global, sa.selected_random, sa.selected_mates, sa.selected_fasttext,
              sa.selected_corpus]
    platform = PlatformResource(storage_root=spec["storage"], profile=PROFILE)
    with dg.DagsterInstance.get() as instance:
        known = set(instance.get_dynamic_partitions(pool_shards.name))
        if missing := [key for key in spec["keys"] if key not in known]:
            instance.add_dynamic_partitions(pool_shards.name, missing)
        partition = spec.get("partition")
        tags = {"dagster/asset_partition_range_start": spec["first"], "dagster/asset_partition_range_end":
                spec["last"]} if spec.get("first") else None
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # peak RSS from here on
        rss_start = _proc("/proc/self/status", ("VmRSS",))["VmRSS"]
        io_start = _proc("/proc/self/io", ("rchar", "read_bytes"))
        started = time.perf_counter()
        result = dg.materialize(assets, selection=[spec["asset"]], partition_key=partition, tags=tags,
                                instance=instance, resources={"platform": platform})
        wall = time.perf_counter() - started
        io_end = _proc("/proc/self/io", ("rchar", "read_bytes"))
        peak = _proc("/proc/self/status", ("VmHWM",))["VmHWM"]
        stamps = {r.dagster_event.event_type_value: r.timestamp for r in instance.all_logs(result.run_id)
                  if r.dagster_event and r.dagster_event.event_type_value in ("STEP_START", "STEP_SUCCESS")}
        checks = [c for c in result.get_asset_check_evaluations() if not c.passed]
        failed = [c.check_name for c in checks if c.severity == dg.AssetCheckSeverity.ERROR]  # blocking: T12, T17
        warned = [c.check_name for c in checks if c.severity != dg.AssetCheckSeverity.ERROR]
    return {"wall_seconds": wall, "step_seconds": stamps["STEP_SUCCESS"] - stamps["STEP_START"],
            "rss_start_kb": rss_start, "rss_peak_kb": peak, "rchar": io_end["rchar"] - io_start["rchar"],
            "read_bytes": io_end["read_bytes"] - io_start["read_bytes"], "failed_checks": failed,
            "warned_checks": warned}


def _run_child(spec: dict[str, Any], dagster_home: Path) -> dict[str, Any]:
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PYTHONUNBUFFERED": "1"}
    env.pop("GROUPMATES_PROFILE", None)
    done = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{spec['asset']} {spec.get('partition') or spec.get('first') or ''} failed:\n"
                         f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def runs_for(keys: list[str], ranges: int) -> list[dict[str, Any]]:
    """Every run of the benchmark at one N, in the order the stages need them."""
    from groupmates_assets.defs.partitions import selection_range_keys

    batches = [keys[i:i + SHARDS_PER_RUN] for i in range(0, len(keys), SHARDS_PER_RUN)]
    runs: list[dict[str, Any]] = [{"asset": "cluster_centroids"}]
    runs += [{"asset": "cluster_assignments", "first": b[0], "last": b[-1]} for b in batches]
    runs += [{"asset": "selected_documents", "partition": r} for r in selection_range_keys(ranges)]
    runs += [{"asset": name} for name in POLICIES_AND_BASELINES]
    runs += [{"asset": "selected_corpus", "first": b[0], "last": b[-1]} for b in batches]
    return [r for r in runs if r["asset"] in wanted_stages()]


def wanted_stages() -> tuple[str, ...]:
    names = os.environ.get("BENCH_SCALE_STAGES")
    stages = tuple(n.strip() for n in names.split(",")) if names else STAGES
    if unknown := set(stages) - set(STAGES):
        raise SystemExit(f"BENCH_SCALE_STAGES: unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    return stages


def measure_size(work: Path, documents: int) -> dict[str, Any]:
    """The pool of ``documents`` written and every run measured; what the table and the plot need."""
    root = work / f"n{documents}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "dagster_home").mkdir(parents=True)
    (root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    shards = shards_for(documents)
    started = time.perf_counter()
    pool = write_pool(root / "storage", documents, shards)
    _say(f"N={documents:,}: {shards} shards written in {time.perf_counter() - started:.0f} s "
         f"(predictions {pool['predictions_bytes'] / 1e6:,.0f} MB)")
    selection = profile_settings(documents)
    runs = []
    for spec in runs_for(pool["keys"], selection["cluster_ranges"]):
        figures = _run_child({**spec, "selection": selection, "storage": str(root / "storage"),
                              "keys": pool["keys"]}, root / "dagster_home")
        if figures["failed_checks"]:
            raise SystemExit(f"{spec}: checks failed: {figures['failed_checks']}")
        runs.append({**spec, **figures})
        _say(f"N={documents:,} {spec['asset']} {spec.get('partition') or spec.get('first') or ''}: "
             f"{figures['step_seconds']:.1f} s, peak {figures['rss_peak_kb'] / 1024:,.0f} MiB "
             f"(+{(figures['rss_peak_kb'] - figures['rss_start_kb']) / 1024:,.0f}), "
             f"read {figures['rchar'] / 1e6:,.1f} MB")
    size = sum(p.stat().st_size for p in (root / "storage").rglob("*") if p.is_file())
    if os.environ.get("BENCH_SCALE_KEEP") != "1":
        shutil.rmtree(root, ignore_errors=True)
    return {"documents": documents, "shards": shards, "selection": selection, "storage_bytes": size, **pool,
            "keys": None, "runs": runs}


# ------------------------------------------------------------------------------------------------ the report


def by_stage(sizes: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """stage -> N -> summed step seconds, the largest peak RSS and its part added by the run (MiB), bytes read."""
    out: dict[str, dict[int, dict[str, float]]] = {stage: {} for stage in wanted_stages()}
    for size in sizes:
        for stage in out:
            runs = [r for r in size["runs"] if r["asset"] == stage]
            out[stage][size["documents"]] = {
                "seconds": sum(r["step_seconds"] for r in runs), "runs": len(runs),
                "median_seconds": float(np.median([r["step_seconds"] for r in runs])) * len(runs),
                "peak_mib": max(r["rss_peak_kb"] for r in runs) / 1024,
                "added_mib": max(r["rss_peak_kb"] - r["rss_start_kb"] for r in runs) / 1024,
                "read_mb": sum(r["rchar"] for r in runs) / 1e6}
    return out


def markdown(stages: dict[str, dict[int, dict[str, float]]]) -> str:
    sizes = sorted(next(iter(stages.values())))
    rows = ["| stage | " + " | ".join(f"N={n:,}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for stage, figures in stages.items():
        rows.append(f"| {stage} | " + " | ".join(
            f"{f['seconds']:.1f} s, {f['peak_mib']:,.0f} MiB (+{f['added_mib']:,.0f}), {f['read_mb']:,.0f} MB"
            for f in (figures[n] for n in sizes)) + " |")
    return "\n".join(rows)


def plot(stages: dict[str, dict[int, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (times, memory) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for stage, figures in stages.items():
        sizes = sorted(figures)
        times.plot(sizes, [figures[n]["seconds"] for n in sizes], marker="o", label=stage)
        memory.plot(sizes, [figures[n]["added_mib"] for n in sizes], marker="o", label=stage)
    low, high = min(sizes), max(sizes)
    first = min(f[low]["seconds"] for f in stages.values())
    times.plot([low, high], [first, first * high / low], "k--", linewidth=0.8, label="linear")
    for ax, title, ylabel in ((times, "wall time per stage (its runs' steps)", "seconds"),
                              (memory, "peak RSS added by the largest run", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("documents in the pool", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, which="both", linewidth=0.3)
    times.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def figures(stages: dict[str, dict[int, dict[str, float]]], sizes: list[dict[str, Any]]) -> list[Figure]:
    ns = sorted(s["documents"] for s in sizes)
    mode = (f"fixed k = {fixed_clusters():,} (clusters of N / k)" if fixed_clusters() else
            f"fixed mean cluster size {CLUSTER_SIZE:,} (k = N / {CLUSTER_SIZE:,})")
    out = [Figure("scale: setup", f"N = {', '.join(f'{n:,}' for n in ns)}", "",
                  f"{DIM}-d; {mode}; {DOCS_PER_RANGE:,} documents per range partition; shards "
                  f"{', '.join(str(s['shards']) for s in sizes)}; every run in a fresh process, one at a time")]
    for stage, by_n in stages.items():
        for n in ns:
            f = by_n[n]
            out.append(Figure(f"scale: {stage}, N={n:,}", round(f["seconds"], 2), "s",
                              f"{f['runs']} runs; peak RSS {f['peak_mib']:,.0f} MiB (+{f['added_mib']:,.0f} by the "
                              f"run); read {f['read_mb']:,.0f} MB"))
    if len(ns) >= 2:
        big, half = ns[-1], ns[-2]
        for stage, by_n in stages.items():
            ratio = by_n[big]["seconds"] / max(by_n[half]["seconds"], 1e-9)
            verdict = "PASS" if ratio <= 2.2 else "FAIL"
            out.append(Figure(f"scale: {stage} time({big:,}) / time({half:,})", round(ratio, 2), "x",
                              f"{verdict} (goal <= 2.2 for a doubling; expected {expected_growth(stage)})"))
            if by_n[big]["runs"] > 2:  # other work on the machine only adds time: the median run resists it
                robust = by_n[big]["median_seconds"] / max(by_n[half]["median_seconds"], 1e-9)
                out.append(Figure(f"scale: {stage} time({big:,}) / time({half:,}), median run x runs",
                                  round(robust, 2), "x", f"{'PASS' if robust <= 2.2 else 'FAIL'} (goal <= 2.2; "
                                  "the same runs, each size's total taken as its median run times its runs)"))
    if len(ns) >= 2 and "selected_documents" in stages:
        big, reference = ns[-1], 500_000 if 500_000 in ns[:-1] else ns[0]
        part = stages["selected_documents"]
        added = part[big]["added_mib"] / max(part[reference]["added_mib"], 1e-9)
        peak = part[big]["peak_mib"] / max(part[reference]["peak_mib"], 1e-9)
        out.append(Figure(f"scale: selected_documents partition peak RSS, N={big:,} / N={reference:,}",
                          round(peak, 3), "x",
                          f"{'PASS' if peak <= 1.2 else 'FAIL'} (goal <= 1.2; {DOCS_PER_RANGE:,} documents per "
                          f"range at every N); added by the run: {part[big]['added_mib']:,.0f} / "
                          f"{part[reference]['added_mib']:,.0f} MiB = {added:.2f}x"))
    return out


def run(repeats: int = 1) -> list[Figure]:
    """One pass (the benchmark is long; ``repeats`` is not used): every size, then the table and the plot."""
    sizes_wanted = [int(n) for n in os.environ.get("BENCH_SCALE_SIZES", ",".join(map(str, SIZES))).split(",")]
    work = Path(os.environ.get("BENCH_SCALE_DIR") or tempfile.mkdtemp(prefix="bench-scale-"))
    sizes = [measure_size(work, n) for n in sizes_wanted]
    stages = by_stage(sizes)
    table = markdown(stages)
    print(table, file=sys.stderr)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = results_stem()
    (RESULTS / f"{stem}.json").write_text(json.dumps({"sizes": sizes, "stages": {
        s: {str(n): f for n, f in by_n.items()} for s, by_n in stages.items()}}, indent=1) + "\n", encoding="utf-8")
    plot(stages, RESULTS / f"{stem}.png")
    _say(f"wrote {RESULTS / f'{stem}.json'} and {RESULTS / f'{stem}.png'}")
    return figures(stages, sizes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from dataclasses import asdict

    print(json.dumps([asdict(f) for f in run()], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
