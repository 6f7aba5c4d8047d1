"""The selection report's arithmetic: mean curves over seeds, tokens to reach the baseline, tables."""

from __future__ import annotations

import pytest

from groupmates_assets.lib import report as rp

pytestmark = pytest.mark.unit


def _evaluation(points_per_seed: list[list[tuple[int, float, float]]]) -> dict:
    """An evaluation report from (step, core_centered, bits_per_byte) points per seed (64 tokens per step)."""
    runs = [{"seed": seed, "points": [{"step": st, "tokens_seen": 64 * st, "core_centered": c, "bits_per_byte": b,
                                       "heldout_loss": 2 * b} for st, c, b in pts]}
            for seed, pts in enumerate(points_per_seed)]
    finals = [r["points"][-1] for r in runs]

    def summary(key):
        values = [p[key] for p in finals]
        mean = sum(values) / len(values)
        return {"mean": mean, "std": (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5, "values": values}

    final = {"step": finals[0]["step"], "tokens_seen": finals[0]["tokens_seen"],
             "core_centered": summary("core_centered"), "bits_per_byte": summary("bits_per_byte"),
             "heldout_loss": summary("heldout_loss"), "tasks": {"copa": {"mean": 0.1, "std": 0.0, "values": [0.1]}}}
    return {"runs": runs, "final": final}


def test_tokens_to_reach_interpolates_between_checkpoints():
    points = [{"tokens_seen": 100, "core_centered": 0.0, "bits_per_byte": 3.0},
              {"tokens_seen": 200, "core_centered": 0.2, "bits_per_byte": 2.0}]
    assert rp.tokens_to_reach(points, "core_centered", 0.1) == {"tokens": 150, "exact": True}
    assert rp.tokens_to_reach(points, "bits_per_byte", 2.5) == {"tokens": 150, "exact": True}  # lower is better
    assert rp.tokens_to_reach(points, "core_centered", -0.5) == {"tokens": 100, "exact": False}  # an upper bound
    assert rp.tokens_to_reach(points, "core_centered", 0.3) is None
    assert rp.tokens_to_reach(points, "core_centered", None) is None


def test_mean_points_and_loss_curve_average_over_seeds():
    runs = _evaluation([[(5, 0.0, 3.0), (10, 0.2, 2.0)], [(5, 0.2, 2.0), (10, 0.4, 1.0)]])["runs"]
    points = rp.mean_points(runs)
    assert [p["step"] for p in points] == [5, 10]
    assert points[1]["core_centered"] == pytest.approx(0.3) and points[1]["core_centered_std"] == pytest.approx(0.1)
    steps, losses = rp.mean_loss_curve([[{"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.0}],
                                        [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 4.0}]], window=1)
    assert steps == [1, 2] and losses == [3.0, 3.0]


def test_report_compares_methods_with_the_baseline_and_renders():
    evaluations = {
        "group_mates": _evaluation([[(5, 0.1, 2.5), (10, 0.3, 1.5)], [(5, 0.1, 2.5), (10, 0.3, 1.5)]]),
        "random": _evaluation([[(5, 0.0, 3.0), (10, 0.2, 2.0)], [(5, 0.0, 3.0), (10, 0.2, 2.0)]]),
    }
    curves = {m: [[{"step": s, "loss": 5.0 - s / 10} for s in range(1, 11)]] * 2 for m in evaluations}
    corpora = {m: {"documents": 10, "tokens": 500, "passes": 2, "token_budget": 640} for m in evaluations}
    costs = [{"component": "oracle", "seconds": 10.0, "kind": "selection", "share": 0.1},
             {"component": "pretraining", "seconds": 90.0, "kind": "pretraining", "share": 0.9}]
    report = rp.build_report(evaluations, curves, corpora, costs)
    focus = report["methods"]["group_mates"]
    assert focus["delta_vs_baseline"]["core_centered"] == pytest.approx(0.1)
    # random ends at core 0.2 at 640 tokens; group_mates passes 0.2 halfway between its two checkpoints.
    assert focus["tokens_to_reach_baseline"]["core_centered"] == {"tokens": 480, "exact": True}
    assert focus["tokens_to_reach_baseline"]["bits_per_byte"] == {"tokens": 480, "exact": True}
    assert report["overhead_share"] == pytest.approx(0.1)
    assert any("better by 0.1000" in line and "larger than" in line for line in report["verdict"])
    headline = rp.headline_markdown(report)
    assert "| group_mates | 0.3000 | +0.1000 |" in headline and "480 (75%)" in headline
    markdown = rp.to_markdown(report, "ci", {"training_loss.png": "a.png", "heldout_bits_per_byte.png": "b.png",
                                             "core_centered.png": "c.png"})
    assert "![training_loss.png](a.png)" in markdown and "| copa | 0.1000 | 0.1000 |" in markdown
    for png in (rp.loss_curves_png(report), rp.metric_png(report, "bits_per_byte", "bits per byte")):
        assert png.startswith(b"\x89PNG")
    figures = rp.figures(report)
    assert list(figures) == ["training_loss.png", "heldout_bits_per_byte.png", "core_centered.png"]
    assert all(png.startswith(b"\x89PNG") for png in figures.values())
