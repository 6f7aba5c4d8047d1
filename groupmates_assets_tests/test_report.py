"""The selection report's arithmetic: mean curves over seeds, tokens to reach the baseline, paired intervals against
the baseline and the verdicts they support, tables."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from groupmates_assets.lib import composition, stats
from groupmates_assets.lib import report as rp

pytestmark = pytest.mark.unit

BASELINES = {"copa": (0.5, 0.5), "boolq": (0.62, 0.5)}  # (DCLM, 1/n)
N_ITEMS, N_DOCS = 40, 30
SPEC = stats.BootstrapSpec(resamples=500)


def _point(step: int, correct: dict[str, list[int]], nll: list[float], sources: list[str] | None = None,
           rows: list[int] | None = None) -> dict:
    """A stored evaluation point whose figures are computed from its per-item hits and per-document losses."""
    tasks = {}
    for task, hits in correct.items():
        rb, uniform = BASELINES[task]
        acc = float(np.mean(hits))
        tasks[task] = {"random_baseline": rb, "random_baseline_uniform": uniform, "centered": (acc - rb) / (1 - rb),
                       "centered_uniform": (acc - uniform) / (1 - uniform), "item_correct": list(hits),
                       "item_rows": rows or [3 * i for i in range(len(hits))]}
    n_bytes = [100 + 10 * i for i in range(len(nll))]
    documents = {"nll": nll, "tokens": [b // 4 for b in n_bytes], "bytes": n_bytes}
    if sources:
        documents["source"] = sources
    return {"step": step, "tokens_seen": 64 * step, "tasks": tasks,
            "core_centered": float(np.mean([t["centered"] for t in tasks.values()])),
            "core_centered_uniform": float(np.mean([t["centered_uniform"] for t in tasks.values()])),
            "bits_per_byte": sum(nll) / (math.log(2) * sum(n_bytes)), "heldout_loss": sum(nll) / sum(n_bytes) * 4,
            "heldout_documents": documents}


def _model(right: int, nll_per_byte: float, offset: int = 0, sources: list[str] | None = None) -> dict:
    """A model right on ``right`` of each task's items (from ``offset``) with ``nll_per_byte`` (plus document noise)."""
    hits = [int((i - offset) % N_ITEMS < right) for i in range(N_ITEMS)]
    noise = np.random.default_rng(offset).normal(0, 0.02, N_DOCS)
    nll = [(nll_per_byte + e) * (100 + 10 * i) for i, e in enumerate(noise)]
    return {"correct": {"copa": hits, "boolq": hits}, "nll": nll, "sources": sources}


def _evaluation(seeds: list[list[tuple[int, dict]]]) -> dict:
    """An evaluation report (as lib.evaluation.method_report writes it) from per seed, (step, model) pairs."""
    runs = [{"seed": seed, "points": [_point(step, m["correct"], m["nll"], m["sources"]) for step, m in points]}
            for seed, points in enumerate(seeds)]
    finals = [r["points"][-1] for r in runs]

    def summary(values):
        mean, std = rp.mean_std(values)
        return {"mean": mean, "std": std, "values": values}

    final = {"step": finals[0]["step"], "tokens_seen": finals[0]["tokens_seen"],
             **{k: summary([p[k] for p in finals]) for k in ("core_centered", "core_centered_uniform",
                                                              "bits_per_byte", "heldout_loss")},
             "tasks": {t: summary([p["tasks"][t]["centered"] for p in finals]) for t in BASELINES},
             "tasks_uniform": {t: summary([p["tasks"][t]["centered_uniform"] for p in finals]) for t in BASELINES},
             "random_baselines": {t: {"dclm": d, "uniform": u} for t, (d, u) in BASELINES.items()}}
    return {"runs": runs, "final": final, "evaluation_fingerprint": "efp"}


def _report(evaluations: dict[str, dict]) -> dict:
    curves = {m: [[{"step": s, "loss": 5.0 - s / 10} for s in range(1, 11)]] * len(e["runs"])
              for m, e in evaluations.items()}
    corpora = {m: {"documents": 10, "tokens": 500, "passes": 2, "token_budget": 640} for m in evaluations}
    costs = [{"component": "oracle", "seconds": 10.0, "kind": "selection", "share": 0.1},
             {"component": "pretraining", "seconds": 90.0, "kind": "pretraining", "share": 0.9}]
    return rp.build_report(evaluations, curves, corpora, costs, spec=SPEC)


def test_tokens_to_reach_interpolates_between_checkpoints():
    points = [{"tokens_seen": 100, "core_centered": 0.0, "bits_per_byte": 3.0},
              {"tokens_seen": 200, "core_centered": 0.2, "bits_per_byte": 2.0}]
    assert rp.tokens_to_reach(points, "core_centered", 0.1) == {"tokens": 150, "exact": True}
    assert rp.tokens_to_reach(points, "bits_per_byte", 2.5) == {"tokens": 150, "exact": True}  # lower is better
    assert rp.tokens_to_reach(points, "core_centered", -0.5) == {"tokens": 100, "exact": False}  # an upper bound
    assert rp.tokens_to_reach(points, "core_centered", 0.3) is None
    assert rp.tokens_to_reach(points, "core_centered", None) is None


def test_mean_points_use_the_sample_std_and_loss_curve_averages_over_seeds():
    runs = [{"seed": 0, "points": [{"step": 5, "tokens_seen": 320, "core_centered": 0.0, "bits_per_byte": 3.0},
                                   {"step": 10, "tokens_seen": 640, "core_centered": 0.2, "bits_per_byte": 2.0}]},
            {"seed": 1, "points": [{"step": 10, "tokens_seen": 640, "core_centered": 0.4, "bits_per_byte": 1.0}]}]
    points = rp.mean_points(runs)
    assert [p["step"] for p in points] == [10]  # step 5: one seed only
    assert points[0]["core_centered"] == pytest.approx(0.3)
    assert points[0]["core_centered_std"] == pytest.approx(0.1 * math.sqrt(2))  # ddof=1 (ddof=0 gives 0.1)
    assert rp.mean_std([0.5]) == (0.5, None)  # one seed: no spread
    steps, losses = rp.mean_loss_curve([[{"step": 1, "loss": 4.0}, {"step": 2, "loss": 2.0}],
                                        [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 4.0}]], window=1)
    assert steps == [1, 2] and losses == [3.0, 3.0]


def test_identical_models_give_zero_intervals_and_no_detectable_difference():
    same = _evaluation([[(10, _model(20, 0.02))]])
    report = _report({"group_mates": same, "random": _evaluation([[(10, _model(20, 0.02))]])})
    final = report["methods"]["group_mates"]["vs_baseline_final"]
    for metric in ("core_centered", "bits_per_byte"):
        assert (final[metric]["estimate"], final[metric]["low"], final[metric]["high"]) == (0.0, 0.0, 0.0)
    assert len(report["verdict"]) == 2
    assert all(line.endswith(": no detectable difference") for line in report["verdict"])


def test_verdict_names_the_interval_and_says_better_worse_or_no_detectable_difference():
    random = _evaluation([[(10, _model(20, 0.030))]])
    evaluations = {"group_mates": _evaluation([[(10, _model(36, 0.020, offset=1))]]),  # far better on both
                   "mates": _evaluation([[(10, _model(21, 0.030, offset=3))]]),  # one item more, same losses
                   "fasttext": _evaluation([[(10, _model(20, 0.040, offset=2))]]),  # worse held-out text
                   "random": random}
    report = _report(evaluations)
    lines = {line.split(",")[0] + "," + line.split(",")[1].split(":")[0]: line for line in report["verdict"]}
    core = lines["group_mates − random, core centered accuracy"]
    assert core.startswith("group_mates − random, core centered accuracy: +")
    assert "(paired bootstrap over 80 items in 2 tasks, 95%)" in core and core.endswith(": better")
    assert lines["group_mates − random, held-out bits per byte"].endswith(": better")  # lower is better
    assert lines["mates − random, core centered accuracy"].endswith(": no detectable difference")
    assert lines["fasttext − random, held-out bits per byte"].endswith(": worse")
    assert report["verdict"][0].startswith("group_mates")  # the focus method first
    interval = report["methods"]["mates"]["vs_baseline_final"]["core_centered"]
    assert interval["low"] <= 0 <= interval["high"] and interval["n"] == 2 * N_ITEMS
    # the estimate is the difference of mean centered accuracy (DCLM baselines): copa /0.5, boolq /0.38
    assert interval["estimate"] == pytest.approx((1 / 40 / 0.5 + 1 / 40 / 0.38) / 2)
    metadata = rp.report_metadata(report)
    assert metadata["group_mates_minus_random_core_centered_low"] > 0
    assert metadata["fasttext_minus_random_bits_per_byte_low"] > 0
    assert "group_mates_minus_random_core_centered_seeds_low" not in metadata  # one seed: no t interval


def test_items_must_be_the_same_to_be_paired():
    model = _model(20, 0.03)
    a = [_point(10, model["correct"], model["nll"])]
    b = [_point(10, model["correct"], model["nll"], rows=list(range(1, N_ITEMS + 1)))]
    with pytest.raises(ValueError, match=r"x against random, task boolq: item_rows differ .*cannot be paired"):
        rp.item_differences(a, b, "x against random")
    fewer = [_point(10, model["correct"], model["nll"][:-1])]
    with pytest.raises(ValueError, match="held-out documents differ"):
        rp.document_differences(a, fewer, "x against random")


def test_several_seeds_average_items_and_add_a_t_interval_of_per_seed_differences():
    seeds_a = [[(10, _model(24, 0.03, offset=0))], [(10, _model(28, 0.03, offset=0))]]
    seeds_b = [[(10, _model(20, 0.03, offset=5))], [(10, _model(20, 0.03, offset=9))]]
    a, b = _evaluation(seeds_a), _evaluation(seeds_b)
    (comparison,) = rp.compare_runs(a["runs"], b["runs"], ("a", "b"), SPEC)
    per_seed = [ra["points"][0]["core_centered"] - rb["points"][0]["core_centered"]
                for ra, rb in zip(a["runs"], b["runs"], strict=True)]
    assert comparison["core_centered"]["estimate"] == pytest.approx(np.mean(per_seed))  # items averaged over seeds
    expected = stats.t_interval(per_seed)
    assert comparison["core_centered_seeds"] == pytest.approx(expected.as_dict())
    assert comparison["seeds"] == 2 and comparison["items"] == 2 * N_ITEMS
    line = rp.verdict_line("a", "b", comparison, "core_centered")
    assert "per-seed differences" in line and "(Student t over 2 seeds)" in line


def test_report_markdown_and_plots_show_the_intervals():
    sources = ["wiki"] * 15 + ["web"] * 15
    random = _evaluation([[(5, _model(10, 0.04, sources=sources)), (10, _model(20, 0.03, sources=sources))]])
    focus = _evaluation([[(5, _model(12, 0.038, offset=1, sources=sources)),
                          (10, _model(30, 0.025, offset=1, sources=sources))]])
    report = _report({"group_mates": focus, "random": random})
    figures = report["methods"]["group_mates"]
    assert [c["step"] for c in figures["vs_baseline"]] == [5, 10]  # every evaluated checkpoint
    assert set(figures["vs_baseline_final"]["sources"]) == {"wiki", "web"}
    assert report["intervals"]["resamples"] == 500 and report["intervals"]["confidence"] == 0.95
    final = figures["vs_baseline_final"]
    core_text = stats.Interval(**final["core_centered"]).text()
    headline = rp.headline_markdown(report)
    assert f"| group_mates | {figures['core_centered']['mean']:.4f} | {core_text} |" in headline
    images = {name: f"{name}.link" for name in rp.FIGURE_NAMES}
    markdown = rp.to_markdown(report, "ci", images)
    assert report["verdict"][0] in markdown and "## Differences from random (final checkpoint)" in markdown
    assert f"| boolq | {stats.Interval(**final['tasks']['boolq']).text()} |" in markdown  # per-task intervals
    assert f"| web | {stats.Interval(**final['sources']['web']).text()} |" in markdown  # per-source intervals
    assert "| boolq | 0.6200 | 0.5000 |" in markdown  # both random baselines per task
    assert "![core_centered_vs_random.png](core_centered_vs_random.png.link)" in markdown
    pngs = rp.figures(report)
    assert list(pngs) == list(rp.FIGURE_NAMES) and all(p.startswith(b"\x89PNG") for p in pngs.values())


def test_report_explains_every_method_and_shows_the_composition_of_the_corpora():
    evaluations = {"group_mates": _evaluation([[(10, _model(20, 0.02))]]), "random": _evaluation([[(10, _model(20,
                                                                                                           0.02))]])}
    curves = {m: [[{"step": 1, "loss": 4.0}]] for m in evaluations}
    corpora = {m: {"documents": 5, "tokens": 500, "passes": 1, "token_budget": 500} for m in evaluations}
    table = composition.total_composition([composition.shard_composition(
        pa.table({"doc_id": ["a", "b"], "fields": ['{"source": "wiki"}', '{"source": "code"}']}),
        {"group_mates": pa.table({"doc_id": ["a"], "shard": ["s"]}), "random": pa.table({"doc_id": ["b"],
                                                                                          "shard": ["s"]})},
        "s", pa.table({"doc_id": ["a", "b"], "cluster": pa.array([0, 1], pa.int64())}), "source")])
    report = rp.build_report(evaluations, curves, corpora, [], spec=SPEC,
                             descriptions={"group_mates": "greedy per cluster.", "random": "a uniform sample."},
                             composition=composition.summarize(table, list(evaluations)))
    markdown = rp.to_markdown(report, "ci", {name: name for name in rp.FIGURE_NAMES})
    assert "- **group_mates**: greedy per cluster.\n- **random**: a uniform sample." in markdown
    assert "## Composition of the selected corpora" in markdown
    assert "| wiki | 50.0% | 100.0% | 0.0% |" in markdown and report["composition"]["pool"]["documents"] == 2
    bare = rp.to_markdown(_report(evaluations), "ci", {name: name for name in rp.FIGURE_NAMES})
    assert "## The methods" not in bare and "## Composition" not in bare  # both are optional inputs


def test_report_compares_methods_with_the_baseline_at_equal_tokens():
    evaluations = {"group_mates": _evaluation([[(5, _model(16, 0.035)), (10, _model(32, 0.02))]] * 2),
                   "random": _evaluation([[(5, _model(8, 0.04)), (10, _model(24, 0.03))]] * 2)}
    report = _report(evaluations)
    focus, base = report["methods"]["group_mates"], report["methods"]["random"]
    assert focus["delta_vs_baseline"]["core_centered"] == pytest.approx(
        focus["core_centered"]["mean"] - base["core_centered"]["mean"])
    # random ends at 24 of 40 right; group_mates has 16 at step 5 and 32 at step 10: it passes 24 halfway (480 tokens)
    assert focus["tokens_to_reach_baseline"]["core_centered"] == {"tokens": 480, "exact": True}
    assert report["overhead_share"] == pytest.approx(0.1)
    assert "480 (75%)" in rp.headline_markdown(report)


def test_final_difference_needs_the_same_evaluation_settings():
    a = _evaluation([[(5, _model(10, 0.04)), (10, _model(30, 0.03, offset=2))]])
    b = _evaluation([[(5, _model(10, 0.04)), (10, _model(20, 0.03))]])
    final = rp.final_difference(a, b, ("a", "b"), SPEC)
    assert final["step"] == 10 and final == rp.compare_runs(a["runs"], b["runs"], ("a", "b"), SPEC)[-1]
    assert rp.final_difference(a, {**b, "evaluation_fingerprint": "other"}, ("a", "b"), SPEC) is None
    assert set(rp.difference_metadata("a", "b", final)) == {
        f"a_minus_b_{metric}{suffix}" for metric in ("core_centered", "bits_per_byte")
        for suffix in ("", "_low", "_high")}


def test_evaluation_metadata_gives_the_difference_from_random_once_random_is_stored(tmp_path):
    from groupmates_assets.defs.evaluation.assets import _vs_random
    from groupmates_assets.lib.storage import Storage

    storage = Storage(str(tmp_path / "store"))
    focus = _evaluation([[(10, _model(36, 0.02, offset=1))]])
    assert _vs_random(storage, "group_mates", focus) == {}  # random not evaluated yet
    storage.write_json("evaluation/random.json", _evaluation([[(10, _model(20, 0.03))]]))
    metadata = _vs_random(storage, "group_mates", focus)
    assert metadata["group_mates_minus_random_core_centered_low"] > 0
    assert metadata["group_mates_minus_random_bits_per_byte_high"] < 0
    assert "core centered accuracy" in metadata["verdict_vs_random"].value and ": better" in metadata[
        "verdict_vs_random"].value
    assert _vs_random(storage, "random", focus) == {}
