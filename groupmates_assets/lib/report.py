"""The side-by-side comparison of selection methods at equal tokens: figures, tables and plots (no Dagster).

Inputs are the stored outputs of the evaluation and pretraining stages (per method: evaluated checkpoints of
every seed, training-loss curves, the corpus manifest) and a cost table; everything here is arithmetic on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from groupmates_assets.lib import plots

HIGHER_IS_BETTER = {"core_centered": True, "bits_per_byte": False}


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and (population) standard deviation of the finite values; (None, None) where there are none."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return (float(np.mean(finite)), float(np.std(finite))) if finite else (None, None)


def mean_points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint step, the mean and spread over seeds of each metric (steps every seed evaluated)."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        for point in run["points"]:
            by_step.setdefault(int(point["step"]), []).append(point)
    points = []
    for step in sorted(by_step):
        group = by_step[step]
        if len(group) < len(runs):
            continue
        point = {"step": step, "tokens_seen": int(group[0]["tokens_seen"] or 0)}
        for metric in HIGHER_IS_BETTER:
            point[metric], point[f"{metric}_std"] = mean_std([p.get(metric) for p in group])
        points.append(point)
    return points


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
                 costs: list[dict[str, Any]], baseline: str = "random", focus: str = "group_mates") -> dict[str, Any]:
    """Every figure of the report as one JSON-able dict."""
    methods: dict[str, dict[str, Any]] = {}
    for method, evaluation in evaluations.items():
        final = evaluation["final"]
        final_losses = [c[-1]["loss"] for c in curves[method] if c]
        loss_mean, loss_std = mean_std(final_losses)
        methods[method] = {
            "core_centered": final["core_centered"], "bits_per_byte": final["bits_per_byte"],
            "heldout_loss": final["heldout_loss"], "train_loss": {"mean": loss_mean, "std": loss_std},
            "tasks": {t: s["mean"] for t, s in final["tasks"].items()}, "tokens_seen": final["tokens_seen"],
            "seeds": len(evaluation["runs"]), "points": mean_points(evaluation["runs"]),
            "loss_curve": mean_loss_curve(curves[method]),
            "corpus": {k: corpora[method].get(k) for k in ("documents", "tokens", "passes", "token_budget")},
        }
    base = methods[baseline]
    for figures in methods.values():
        figures["tokens_to_reach_baseline"] = {
            metric: tokens_to_reach(figures["points"], metric, base[metric]["mean"]) for metric in HIGHER_IS_BETTER}
        figures["delta_vs_baseline"] = {
            metric: (None if figures[metric]["mean"] is None or base[metric]["mean"] is None
                     else figures[metric]["mean"] - base[metric]["mean"]) for metric in HIGHER_IS_BETTER}
    selection_seconds = sum(c["seconds"] for c in costs if c["kind"] == "selection")
    total_seconds = sum(c["seconds"] for c in costs)
    return {"baseline": baseline, "focus": focus, "methods": methods, "costs": costs,
            "overhead_share": selection_seconds / total_seconds if total_seconds else 0.0,
            "verdict": verdict(methods, focus, baseline)}


def verdict(methods: dict[str, dict], focus: str, baseline: str) -> list[str]:
    """Plain sentences on whether the focus method's differences exceed the spread over seeds."""
    lines = []
    for metric, label in (("core_centered", "core centered accuracy"), ("bits_per_byte", "held-out bits per byte")):
        a, b = methods[focus][metric], methods[baseline][metric]
        if a["mean"] is None or b["mean"] is None:
            continue
        diff = a["mean"] - b["mean"]
        better = diff > 0 if HIGHER_IS_BETTER[metric] else diff < 0
        spread = (a["std"] or 0.0) + (b["std"] or 0.0)
        seeds = min(methods[focus]["seeds"], methods[baseline]["seeds"])
        if seeds < 2:
            judged = "one seed each, so the spread is unknown"
        elif abs(diff) > spread:
            judged = "larger than the sum of the two spreads over seeds"
        else:
            judged = "within the spread over seeds, so not evidence either way"
        lines.append(f"{focus} vs {baseline}, {label}: {a['mean']:.4f} vs {b['mean']:.4f} "
                     f"({'better' if better else 'not better'} by {abs(diff):.4f}; {judged}).")
    return lines


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


def headline_markdown(report: dict[str, Any]) -> str:
    """The table the main job prints: one row per method at equal tokens."""
    base_tokens = report["methods"][report["baseline"]]["tokens_seen"]
    rows = ["| method | core centered | Δ vs random | held-out bits/byte | final train loss | tokens to random's "
            "core | tokens to random's bits/byte |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, m in report["methods"].items():
        delta = m["delta_vs_baseline"]["core_centered"]
        rows.append(f"| {method} | {_pm(m['core_centered'])} | {'' if delta is None else f'{delta:+.4f}'} | "
                    f"{_pm(m['bits_per_byte'])} | {_pm(m['train_loss'])} | "
                    f"{_reach(m['tokens_to_reach_baseline']['core_centered'], base_tokens)} | "
                    f"{_reach(m['tokens_to_reach_baseline']['bits_per_byte'], base_tokens)} |")
    return "\n".join(rows)


def to_markdown(report: dict[str, Any], profile: str, images: dict[str, str], inline: bool = False) -> str:
    """The whole report; ``images`` maps each plot's file name to a file link, or (``inline``) to an embedded image."""
    methods = report["methods"]
    first = next(iter(methods.values()))
    picture = (lambda name: images[name]) if inline else (lambda name: f"![{name}]({images[name]})")
    tasks = sorted(first["tasks"])
    lines = [
        f"# Selection report ({profile})", "",
        f"Every method trained on {first['tokens_seen']:,} tokens in all, {first['seeds']} seed(s) each; "
        "mean ± standard deviation over seeds. Tokens to reach random's final score are read off the mean curve "
        "over evaluated checkpoints (≤: already reached at the first one).", "",
        headline_markdown(report), "", *[f"- {line}" for line in report["verdict"]], "",
        "## Per-task centered accuracy (final checkpoint, mean over seeds)", "",
        "| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods),
        *[f"| {t} | " + " | ".join(f"{m['tasks'][t]:.4f}" if m["tasks"].get(t) is not None else "n/a"
                                   for m in methods.values()) + " |" for t in tasks], "",
        "## Curves", "", picture("training_loss.png"), "", picture("heldout_bits_per_byte.png"), "",
        picture("core_centered.png"), "",
        "## The corpora (equal budgets)", "",
        "| method | documents | tokens in corpus | data passes | token budget |", "|---|---:|---:|---:|---:|",
        *[f"| {name} | {m['corpus']['documents']:,} | {m['corpus']['tokens']:,} | {m['corpus']['passes']} | "
          f"{m['corpus']['token_budget']:,} |" for name, m in methods.items()], "",
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
    series, bands = {}, {}
    for method, figures in report["methods"].items():
        points = [p for p in figures["points"] if p[metric] is not None]
        series[method] = ([p["tokens_seen"] for p in points], [p[metric] for p in points])
        bands[method] = [p[f"{metric}_std"] or 0.0 for p in points]
    base = report["methods"][report["baseline"]][metric]["mean"]
    return plots.lines_png(series, f"{label} vs tokens", "tokens seen", label, bands=bands,
                           hline=(base, f"{report['baseline']} final") if base is not None else None)


def figures(report: dict[str, Any]) -> dict[str, bytes]:
    """The report's PNG figures by file name: training loss, held-out bits per byte and core score vs tokens."""
    return {
        "training_loss.png": loss_curves_png(report),
        "heldout_bits_per_byte.png": metric_png(report, "bits_per_byte", "held-out bits per byte"),
        "core_centered.png": metric_png(report, "core_centered", "core centered accuracy"),
    }
