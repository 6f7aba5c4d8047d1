"""The side-by-side comparison of selection methods at equal tokens: figures, tables and plots (no Dagster).

Inputs are the stored outputs of the evaluation and pretraining stages (per method: evaluated checkpoints of
every seed, training-loss curves, the corpus manifest) and a cost table; everything here is arithmetic on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from groupmates_assets.lib import composition, plots, stats

HIGHER_IS_BETTER = {"core_centered": True, "bits_per_byte": False}
LABELS = {"core_centered": "core centered accuracy", "bits_per_byte": "held-out bits per byte"}
CURVE_METRICS = ("core_centered", "core_centered_uniform", "bits_per_byte")


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value) of the finite values; (None, None) where
    there are none."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return (float(np.mean(finite)), stats.sample_std(finite)) if finite else (None, None)


def points_by_step(runs: list[dict[str, Any]]) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    """Per checkpoint step that every seed evaluated, each seed's (seed, point), in run order."""
    by_step: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for run in runs:
        for point in run["points"]:
            by_step.setdefault(int(point["step"]), []).append((int(run["seed"]), point))
    return {step: group for step, group in sorted(by_step.items()) if len(group) == len(runs)}


def mean_points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint step, the mean and spread over seeds of each metric (steps every seed evaluated)."""
    points = []
    for step, group in points_by_step(runs).items():
        point = {"step": step, "tokens_seen": int(group[0][1]["tokens_seen"] or 0)}
        for metric in CURVE_METRICS:
            point[metric], point[f"{metric}_std"] = mean_std([p.get(metric) for _, p in group])
        points.append(point)
    return points


# ------------------------------------------------------------------------------ paired differences from a baseline


def _item_scores(points: list[dict[str, Any]], task: str, where: str) -> tuple[list[int], np.ndarray, float]:
    """(source rows, each item's correctness averaged over seeds, random baseline) of one task; every seed must
    have scored the same rows."""
    entries = [p["tasks"][task] for p in points]
    if any("item_correct" not in e or "item_rows" not in e for e in entries):
        raise ValueError(f"{where}, task {task}: the evaluation has no per-item scores (item_correct, item_rows); "
                         "rematerialize evaluation")
    rows = list(entries[0]["item_rows"])
    if any(list(e["item_rows"]) != rows for e in entries[1:]):
        raise ValueError(f"{where}, task {task}: the seeds scored different items")
    return rows, np.mean([e["item_correct"] for e in entries], axis=0), float(entries[0]["random_baseline"])


def item_differences(points_a: list[dict[str, Any]], points_b: list[dict[str, Any]],
                     where: str) -> tuple[list[str], list[np.ndarray], list[float]]:
    """Per task: the paired per-item differences (a minus b, each averaged over seeds) and the weight
    1 / (1 - random baseline) that turns a mean accuracy difference into a centered one. Items are paired by
    their source row; a different item set or baseline is an error."""
    tasks = sorted(points_a[0]["tasks"])
    if tasks != sorted(points_b[0]["tasks"]):
        raise ValueError(f"{where}: different tasks ({', '.join(tasks)} against "
                         f"{', '.join(sorted(points_b[0]['tasks']))}); evaluate both with the same settings")
    differences, weights = [], []
    for task in tasks:
        rows_a, scores_a, baseline_a = _item_scores(points_a, task, where)
        rows_b, scores_b, baseline_b = _item_scores(points_b, task, where)
        if rows_a != rows_b:
            first = next((i for i, (x, y) in enumerate(zip(rows_a, rows_b, strict=False)) if x != y),
                         min(len(rows_a), len(rows_b)))
            raise ValueError(f"{where}, task {task}: item_rows differ ({len(rows_a)} against {len(rows_b)} items, "
                             f"first difference at position {first}), so items cannot be paired; evaluate both "
                             "with the same evaluation settings")
        if baseline_a != baseline_b:
            raise ValueError(f"{where}, task {task}: random baselines differ ({baseline_a} against {baseline_b})")
        differences.append(scores_a - scores_b)
        weights.append(1.0 / (1.0 - baseline_a))
    return tasks, differences, weights


def _documents(points: list[dict[str, Any]], where: str) -> dict[str, Any] | None:
    """Held-out documents of one method: NLL averaged over seeds, bytes, and doc ids and sources where recorded."""
    docs = [p.get("heldout_documents") for p in points]
    if any(d is None for d in docs):
        return None
    first = docs[0]
    for key in ("bytes", "doc_id", "source"):
        if any(d.get(key) != first.get(key) for d in docs[1:]):
            raise ValueError(f"{where}: the seeds scored different held-out documents ({key} differ)")
    return {"nll": np.mean([d["nll"] for d in docs], axis=0), "bytes": np.asarray(first["bytes"], dtype=np.float64),
            "doc_id": first.get("doc_id"), "source": first.get("source")}


def document_differences(points_a: list[dict[str, Any]], points_b: list[dict[str, Any]],
                         where: str) -> dict[str, Any] | None:
    """Paired per-document NLL differences (a minus b, averaged over seeds), the documents' bytes and sources;
    None when either side scored no held-out text."""
    a, b = _documents(points_a, where), _documents(points_b, where)
    if a is None or b is None:
        return None
    same = a["bytes"].shape == b["bytes"].shape and bool(np.all(a["bytes"] == b["bytes"]))
    for key in ("doc_id", "source"):
        same = same and (a[key] is None or b[key] is None or list(a[key]) == list(b[key]))
    if not same:
        raise ValueError(f"{where}: the held-out documents differ (count, bytes, doc_id or source), so they cannot "
                         "be paired; evaluate both with the same evaluation settings")
    source = a["source"] if a["source"] is not None else b["source"]
    return {"nll": a["nll"] - b["nll"], "bytes": a["bytes"], "source": source}


def _seed_differences(group_a: list[tuple[int, dict]], group_b: list[tuple[int, dict]], metric: str,
                      where: str, confidence: float) -> dict[str, Any] | None:
    """Student t interval of the per-seed differences (paired by seed); None for one seed or a missing metric."""
    by_seed_a, by_seed_b = dict(group_a), dict(group_b)
    if sorted(by_seed_a) != sorted(by_seed_b):
        raise ValueError(f"{where}: different seeds ({sorted(by_seed_a)} against {sorted(by_seed_b)}), so per-seed "
                         "differences cannot be paired")
    diffs = [None if by_seed_a[s].get(metric) is None or by_seed_b[s].get(metric) is None
             else by_seed_a[s][metric] - by_seed_b[s][metric] for s in sorted(by_seed_a)]
    interval = stats.t_interval([d for d in diffs if d is not None], confidence)
    return interval.as_dict() if interval else None


def compare_at_step(group_a: list[tuple[int, dict]], group_b: list[tuple[int, dict]], where: str,
                    spec: stats.BootstrapSpec) -> dict[str, Any]:
    """Differences (a minus b) at one checkpoint, each with its interval: core centered accuracy (bootstrap over
    items stratified by task, and per task), held-out bits per byte (bootstrap over documents, pooled and per
    source), and the Student t intervals of the per-seed differences when there are several seeds."""
    points_a, points_b = [p for _, p in group_a], [p for _, p in group_b]
    draw = {"resamples": spec.resamples, "seed": spec.seed, "confidence": spec.confidence}
    tasks, differences, weights = item_differences(points_a, points_b, where)
    result: dict[str, Any] = {
        "items": int(sum(d.size for d in differences)), "tasks_compared": len(tasks), "seeds": len(group_a),
        "core_centered": stats.stratified_mean_difference(differences, weights, **draw).as_dict(),
        "core_centered_seeds": _seed_differences(group_a, group_b, "core_centered", where, spec.confidence),
        "tasks": {t: stats.stratified_mean_difference([d], [w], **draw).as_dict()
                  for t, d, w in zip(tasks, differences, weights, strict=True)},
        "bits_per_byte": None, "bits_per_byte_seeds": None, "sources": {},
    }
    documents = document_differences(points_a, points_b, where)
    if documents is not None:
        bpb = {"scale": 1 / math.log(2), **draw}
        result["bits_per_byte"] = stats.ratio_difference(documents["nll"], documents["bytes"], **bpb).as_dict()
        result["bits_per_byte_seeds"] = _seed_differences(group_a, group_b, "bits_per_byte", where, spec.confidence)
        if documents["source"] is not None:
            sources = np.asarray(documents["source"])
            for source in sorted(set(documents["source"])):
                mask = sources == source
                if mask.sum() >= 2:
                    result["sources"][source] = stats.ratio_difference(
                        documents["nll"][mask], documents["bytes"][mask], **bpb).as_dict()
    return result


def compare_runs(runs_a: list[dict[str, Any]], runs_b: list[dict[str, Any]], names: tuple[str, str],
                 spec: stats.BootstrapSpec) -> list[dict[str, Any]]:
    """``names[0]`` minus ``names[1]`` at every checkpoint both evaluated for every seed, in step order."""
    steps_a, steps_b = points_by_step(runs_a), points_by_step(runs_b)
    out = []
    for step in sorted(set(steps_a) & set(steps_b)):
        where = f"{names[0]} against {names[1]}, step {step}"
        out.append({"step": step, "tokens_seen": int(steps_a[step][0][1]["tokens_seen"] or 0),
                    **compare_at_step(steps_a[step], steps_b[step], where, spec)})
    return out


def final_difference(evaluation: dict[str, Any], baseline_evaluation: dict[str, Any], names: tuple[str, str],
                     spec: stats.BootstrapSpec) -> dict[str, Any] | None:
    """The comparison at the last checkpoint two stored evaluations share; None when they were made with different
    evaluation settings (fingerprints) or share no checkpoint."""
    if evaluation.get("evaluation_fingerprint") != baseline_evaluation.get("evaluation_fingerprint"):
        return None
    comparisons = compare_runs(evaluation["runs"], baseline_evaluation["runs"], names, spec)
    return comparisons[-1] if comparisons else None


def _judge(intervals: list[stats.Interval], higher_is_better: bool) -> str:
    """"no detectable difference" unless every interval excludes 0 on the same side; then "better" or "worse"."""
    if any(i.covers_zero for i in intervals):
        return "no detectable difference"
    signs = {i.estimate > 0 for i in intervals}
    if len(signs) > 1:
        return "no detectable difference (the intervals disagree)"
    return "better" if signs.pop() == higher_is_better else "worse"


def verdict_line(method: str, baseline: str, comparison: dict[str, Any], metric: str) -> str | None:
    """One sentence: the difference, its interval and what it supports; None when the metric was not scored."""
    if comparison.get(metric) is None:
        return None
    interval = stats.Interval(**comparison[metric])
    over = (f"{interval.n} items in {comparison['tasks_compared']} tasks" if metric == "core_centered"
            else f"{interval.n} documents")
    text = (f"{method} − {baseline}, {LABELS[metric]}: {interval.text()} "
            f"(paired bootstrap over {over}, {round(100 * interval.confidence)}%)")
    intervals = [interval]
    if comparison.get(f"{metric}_seeds"):
        seeds = stats.Interval(**comparison[f"{metric}_seeds"])
        intervals.append(seeds)
        text += f"; per-seed differences {seeds.text()} (Student t over {seeds.n} seeds)"
    return f"{text}: {_judge(intervals, HIGHER_IS_BETTER[metric])}"


def verdict(methods: dict[str, dict], focus: str, baseline: str) -> list[str]:
    """Per method against the baseline (``focus`` first), the final checkpoint's differences with their
    intervals, and whether they support a difference."""
    order = [focus] + [m for m in methods if m not in (focus, baseline)] if focus in methods else list(methods)
    lines = []
    for method in order:
        comparison = methods[method].get("vs_baseline_final")
        if method == baseline or not comparison:
            continue
        lines += [line for metric in HIGHER_IS_BETTER
                  if (line := verdict_line(method, baseline, comparison, metric)) is not None]
    return lines


def difference_metadata(method: str, baseline: str, comparison: dict[str, Any] | None) -> dict[str, float]:
    """Flat figures for asset metadata: ``<method>_minus_<baseline>_<metric>`` with ``_low``/``_high`` (bootstrap)
    and ``_seeds_low``/``_seeds_high`` (Student t over seeds) where computed."""
    out: dict[str, float] = {}
    for metric in HIGHER_IS_BETTER:
        for suffix, key in (("", metric), ("_seeds", f"{metric}_seeds")):
            interval = (comparison or {}).get(key)
            if interval is None:
                continue
            name = f"{method}_minus_{baseline}_{metric}{suffix}"
            if not suffix:
                out[name] = interval["estimate"]
            out[f"{name}_low"], out[f"{name}_high"] = interval["low"], interval["high"]
    return out


def tokens_to_reach(points: list[dict[str, Any]], metric: str, target: float | None) -> dict[str, Any] | None:
    """Tokens at which the mean curve first reaches ``target`` (linear between checkpoints); ``exact`` is False
    when the first evaluated checkpoint already reaches it (then the figure is an upper bound). None: never."""
    if target is None:
        return None
    higher = HIGHER_IS_BETTER[metric]
    previous = None
    for point in points:
        value = point.get(metric)
        if value is None:
            continue
        if (value >= target) if higher else (value <= target):
            if previous is None:
                return {"tokens": point["tokens_seen"], "exact": False}
            span = value - previous[metric]
            fraction = 1.0 if span == 0 else (target - previous[metric]) / span
            tokens = previous["tokens_seen"] + fraction * (point["tokens_seen"] - previous["tokens_seen"])
            return {"tokens": round(tokens), "exact": True}
        previous = point
    return None


def mean_loss_curve(curves: list[list[dict[str, Any]]], window: int | None = None) -> tuple[list[int], list[float]]:
    """Training loss averaged over seeds per step, then a trailing moving average (small batches are noisy)."""
    steps = sorted(set.intersection(*(set(int(r["step"]) for r in c) for c in curves))) if curves else []
    by_step = [{int(r["step"]): r["loss"] for r in c} for c in curves]
    losses = np.array([np.mean([c[s] for c in by_step]) for s in steps], dtype=np.float64)
    window = window or max(1, len(steps) // 20)
    if len(losses) and window > 1:
        cumulative = np.cumsum(np.insert(losses, 0, 0.0))
        smoothed = [(cumulative[i + 1] - cumulative[max(0, i + 1 - window)]) / (i + 1 - max(0, i + 1 - window))
                    for i in range(len(losses))]
        losses = np.asarray(smoothed)
    return steps, losses.tolist()


def build_report(evaluations: dict[str, dict], curves: dict[str, list[list[dict]]], corpora: dict[str, dict],
                 costs: list[dict[str, Any]], baseline: str = "random", focus: str = "group_mates",
                 spec: stats.BootstrapSpec | None = None, descriptions: dict[str, str] | None = None,
                 composition: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of the report as one JSON-able dict; ``spec`` draws the intervals (recorded as ``intervals``);
    ``descriptions`` says in one sentence what each method does; ``composition`` is
    ``lib.composition.summarize`` of the selected corpora."""
    spec = spec or stats.BootstrapSpec()
    methods: dict[str, dict[str, Any]] = {}
    for method, evaluation in evaluations.items():
        final = evaluation["final"]
        final_losses = [c[-1]["loss"] for c in curves[method] if c]
        loss_mean, loss_std = mean_std(final_losses)
        methods[method] = {
            "core_centered": final["core_centered"], "core_centered_uniform": final["core_centered_uniform"],
            "bits_per_byte": final["bits_per_byte"], "heldout_loss": final["heldout_loss"],
            "train_loss": {"mean": loss_mean, "std": loss_std},
            "tasks": {t: s["mean"] for t, s in final["tasks"].items()},
            "tasks_uniform": {t: s["mean"] for t, s in final["tasks_uniform"].items()},
            "random_baselines": final["random_baselines"], "tokens_seen": final["tokens_seen"],
            "seeds": len(evaluation["runs"]), "points": mean_points(evaluation["runs"]),
            "loss_curve": mean_loss_curve(curves[method]),
            "corpus": {k: corpora[method].get(k) for k in ("documents", "tokens", "passes", "token_budget")},
        }
    base = methods[baseline]
    for method, figures in methods.items():
        figures["tokens_to_reach_baseline"] = {
            metric: tokens_to_reach(figures["points"], metric, base[metric]["mean"]) for metric in HIGHER_IS_BETTER}
        figures["delta_vs_baseline"] = {
            metric: (None if figures[metric]["mean"] is None or base[metric]["mean"] is None
                     else figures[metric]["mean"] - base[metric]["mean"]) for metric in HIGHER_IS_BETTER}
        if method != baseline:
            figures["vs_baseline"] = compare_runs(evaluations[method]["runs"], evaluations[baseline]["runs"],
                                                  (method, baseline), spec)
            figures["vs_baseline_final"] = figures["vs_baseline"][-1] if figures["vs_baseline"] else None
    selection_seconds = sum(c["seconds"] for c in costs if c["kind"] == "selection")
    total_seconds = sum(c["seconds"] for c in costs)
    return {"baseline": baseline, "focus": focus, "methods": methods, "costs": costs,
            "intervals": {**spec.as_dict(), "items": "percentile bootstrap over items, stratified by task",
                          "documents": "percentile bootstrap over held-out documents",
                          "seeds": "Student t over per-seed differences"},
            "overhead_share": selection_seconds / total_seconds if total_seconds else 0.0,
            "verdict": verdict(methods, focus, baseline),
            "descriptions": {m: (descriptions or {}).get(m) for m in methods if (descriptions or {}).get(m)},
            "composition": composition}


def report_metadata(report: dict[str, Any]) -> dict[str, float]:
    """Every method's differences from the baseline at the final checkpoint, flat (see `difference_metadata`)."""
    out: dict[str, float] = {}
    for method, figures in report["methods"].items():
        if method != report["baseline"]:
            out.update(difference_metadata(method, report["baseline"], figures.get("vs_baseline_final")))
    return out


def _pm(summary: dict[str, Any], digits: int = 4) -> str:
    if summary.get("mean") is None:
        return "n/a"
    std = summary.get("std")
    return f"{summary['mean']:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def _reach(entry: dict[str, Any] | None, base_tokens: int | None) -> str:
    if entry is None:
        return "not reached"
    share = f" ({100 * entry['tokens'] / base_tokens:.0f}%)" if base_tokens else ""
    return f"{'≤ ' if not entry['exact'] else ''}{entry['tokens']:,}{share}"


def _interval(entry: dict[str, Any] | None) -> str:
    return "n/a" if entry is None else stats.Interval(**entry).text()


def _final(figures: dict[str, Any], key: str) -> str:
    comparison = figures.get("vs_baseline_final")
    return "—" if comparison is None else _interval(comparison.get(key))


def headline_markdown(report: dict[str, Any]) -> str:
    """The table the main job prints: one row per method at equal tokens, with the paired differences from the
    baseline and their 95% intervals."""
    base_tokens = report["methods"][report["baseline"]]["tokens_seen"]
    rows = ["| method | core centered | Δ core vs random [95%] | core centered (1/n) | held-out bits/byte | "
            "Δ bits/byte vs random [95%] | final train loss | tokens to random's core | tokens to random's bits/byte |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, m in report["methods"].items():
        rows.append(f"| {method} | {_pm(m['core_centered'])} | {_final(m, 'core_centered')} | "
                    f"{_pm(m['core_centered_uniform'])} | {_pm(m['bits_per_byte'])} | "
                    f"{_final(m, 'bits_per_byte')} | {_pm(m['train_loss'])} | "
                    f"{_reach(m['tokens_to_reach_baseline']['core_centered'], base_tokens)} | "
                    f"{_reach(m['tokens_to_reach_baseline']['bits_per_byte'], base_tokens)} |")
    return "\n".join(rows)


def _intervals_note(report: dict[str, Any]) -> str:
    spec = report["intervals"]
    return (f"Differences from {report['baseline']} are paired: every method scored the same items and held-out "
            f"documents. Intervals are {round(100 * spec['confidence'])}% percentile bootstraps ({spec['resamples']:,} "
            f"resamples, seed {spec['seed']}) over items, stratified by task, and over documents; with several seeds "
            "each item's (document's) score is first averaged over seeds, and the Student t interval of the "
            "per-seed differences is given too. A difference is called better or worse only when every interval "
            "excludes 0; otherwise there is no detectable difference at this sample size.")


def differences_markdown(report: dict[str, Any]) -> list[str]:
    """Per method, the final checkpoint's differences from the baseline with their intervals; per task; per source."""
    compared = {m: f["vs_baseline_final"] for m, f in report["methods"].items() if f.get("vs_baseline_final")}
    if not compared:
        return []
    lines = [f"## Differences from {report['baseline']} (final checkpoint)", "", _intervals_note(report), "",
             "| method | Δ core centered (items) | Δ core centered (seeds, t) | Δ bits/byte (documents) | "
             "Δ bits/byte (seeds, t) |", "|---|---:|---:|---:|---:|",
             *[f"| {m} | {_interval(c['core_centered'])} | {_interval(c['core_centered_seeds'])} | "
               f"{_interval(c['bits_per_byte'])} | {_interval(c['bits_per_byte_seeds'])} |"
               for m, c in compared.items()],
             "", f"### Per-task centered accuracy, difference from {report['baseline']}", "",
             "| task | " + " | ".join(compared) + " |", "|---|" + "---:|" * len(compared)]
    tasks = sorted(next(iter(compared.values()))["tasks"])
    lines += [f"| {t} | " + " | ".join(_interval(c["tasks"].get(t)) for c in compared.values()) + " |" for t in tasks]
    sources = sorted({s for c in compared.values() for s in c.get("sources", {})})
    if sources:
        lines += ["", f"### Held-out bits per byte by source, difference from {report['baseline']}", "",
                  "| source | " + " | ".join(compared) + " |", "|---|" + "---:|" * len(compared),
                  *[f"| {s} | " + " | ".join(_interval(c["sources"].get(s)) for c in compared.values()) + " |"
                    for s in sources]]
    return [*lines, ""]


def tasks_markdown(report: dict[str, Any]) -> list[str]:
    """Per-task centered accuracy of every method under both random baselines (DCLM's table and 1/n)."""
    methods = report["methods"]
    first = next(iter(methods.values()))
    baselines = first["random_baselines"]

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    header = " | ".join(f"{m} | {m} (1/n)" for m in methods)
    return ["## Per-task centered accuracy (final checkpoint, mean over seeds)", "",
            "Centered with DCLM's random baselines (BoolQ 0.62) and, beside each, with 1/number of choices.", "",
            f"| task | chance (DCLM) | chance (1/n) | {header} |", "|---|---:|---:|" + "---:|" * (2 * len(methods)),
            *[f"| {t} | {baselines[t]['dclm']:.4f} | {baselines[t]['uniform']:.4f} | "
              + " | ".join(f"{cell(m['tasks'].get(t))} | {cell(m['tasks_uniform'].get(t))}" for m in methods.values())
              + " |" for t in sorted(first["tasks"])], ""]


def methods_markdown(report: dict[str, Any]) -> list[str]:
    """One sentence per method: what it selects (the registry's descriptions)."""
    descriptions = report.get("descriptions") or {}
    if not descriptions:
        return []
    return ["## The methods", "", *[f"- **{m}**: {text}" for m, text in descriptions.items()], ""]


def to_markdown(report: dict[str, Any], profile: str, images: dict[str, str], inline: bool = False) -> str:
    """The whole report; ``images`` maps each plot's file name to a file link, or (``inline``) to an embedded image."""
    methods = report["methods"]
    first = next(iter(methods.values()))
    picture = (lambda name: images[name]) if inline else (lambda name: f"![{name}]({images[name]})")
    lines = [
        f"# Selection report ({profile})", "",
        f"Every method trained on {first['tokens_seen']:,} tokens in all, {first['seeds']} seed(s) each; "
        "mean ± sample standard deviation over seeds. Tokens to reach random's final score are read off the mean "
        "curve over evaluated checkpoints (≤: already reached at the first one).", "",
        headline_markdown(report), "", *[f"- {line}" for line in report["verdict"]], "",
        *methods_markdown(report), *differences_markdown(report), *tasks_markdown(report),
        "## Curves", "", *[f"{picture(name)}\n" for name in FIGURE_NAMES],
        "## The corpora (equal budgets)", "",
        "| method | documents | tokens in corpus | data passes | token budget |", "|---|---:|---:|---:|---:|",
        *[f"| {name} | {m['corpus']['documents']:,} | {m['corpus']['tokens']:,} | {m['corpus']['passes']} | "
          f"{m['corpus']['token_budget']:,} |" for name, m in methods.items()], "",
        *(composition.to_markdown(report["composition"]) if report.get("composition") else []),
        "## Selection overhead (wall time of the latest materializations)", "",
        "| component | kind | seconds | share |", "|---|---|---:|---:|",
        *[f"| {c['component']} | {c['kind']} | {c['seconds']:.1f} | {100 * c['share']:.1f}% |"
          for c in report["costs"]],
        "", f"Selection overhead: {100 * report['overhead_share']:.1f}% of the time of one Group-MATES run.",
    ]
    return "\n".join(lines)


def loss_curves_png(report: dict[str, Any]) -> bytes:
    series = {m: tuple(f["loss_curve"]) for m, f in report["methods"].items()}
    return plots.lines_png(series, "training loss (mean over seeds, moving average)", "step", "loss")


def metric_png(report: dict[str, Any], metric: str, label: str) -> bytes:
    """The metric against tokens, mean over seeds with a ± sample standard deviation band."""
    series, bands = {}, {}
    for method, figures in report["methods"].items():
        points = [p for p in figures["points"] if p[metric] is not None]
        series[method] = ([p["tokens_seen"] for p in points], [p[metric] for p in points])
        bands[method] = [p[f"{metric}_std"] or 0.0 for p in points]
    base = report["methods"][report["baseline"]][metric]["mean"]
    return plots.lines_png(series, f"{label} vs tokens (± sd over seeds)", "tokens seen", label, bands=bands,
                           hline=(base, f"{report['baseline']} final") if base is not None else None)


def difference_png(report: dict[str, Any], metric: str, label: str) -> bytes:
    """Each method's difference from the baseline against tokens, with its bootstrap interval as a band."""
    series, ranges = {}, {}
    for method, figures in report["methods"].items():
        points = [c for c in figures.get("vs_baseline") or [] if c.get(metric) is not None]
        if points:
            series[method] = ([c["tokens_seen"] for c in points], [c[metric]["estimate"] for c in points])
            ranges[method] = ([c[metric]["low"] for c in points], [c[metric]["high"] for c in points])
    confidence = round(100 * report["intervals"]["confidence"])
    return plots.lines_png(series, f"{label}: difference from {report['baseline']} ({confidence}% interval)",
                           "tokens seen", f"Δ {label}", ranges=ranges, hline=(0.0, report["baseline"]))


FIGURE_NAMES = ("training_loss.png", "heldout_bits_per_byte.png", "core_centered.png",
                "heldout_bits_per_byte_vs_random.png", "core_centered_vs_random.png")


def figures(report: dict[str, Any]) -> dict[str, bytes]:
    """The report's PNG figures by file name (`FIGURE_NAMES`): training loss, held-out bits per byte and core score
    vs tokens, and each method's difference from the baseline vs tokens with its interval band."""
    return dict(zip(FIGURE_NAMES, (
        loss_curves_png(report),
        metric_png(report, "bits_per_byte", "held-out bits per byte"),
        metric_png(report, "core_centered", "core centered accuracy"),
        difference_png(report, "bits_per_byte", "held-out bits per byte"),
        difference_png(report, "core_centered", "core centered accuracy"),
    ), strict=True))
