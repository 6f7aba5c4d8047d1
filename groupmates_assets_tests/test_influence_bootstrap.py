"""Bootstrap beam search: equals the reference algorithm (with the step-0 fix), tails per invariant T18."""

import numpy as np
import pytest
import torch

from groupmates_assets.lib.influence import bootstrap as boot
from groupmates_assets.lib.influence import training as tr

pytestmark = pytest.mark.unit


def _pool(n=60, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) * 0.9
    u = torch.randn(n, generator=g)
    return h, u


def reference_beam_search(h, u, alpha, tau, length, width, keep, order):
    """method.md 3.3's pseudo-code (a running avg_rel of N floats per beam), step 0 scored by u (the 7.2 fix)."""
    h, pred = h.double().numpy(), u.double().numpy()
    beams = [([], np.zeros(len(pred)), 0.0)]
    for i in range(length):
        new = []
        for indices, avg_rel, score in beams:
            s = pred.copy() if i == 0 else avg_rel * pred
            s[indices] = order * np.inf
            for j in np.argsort(order * s, kind="stable")[:width]:
                rel_j = alpha * (1 - h @ h[j] / tau)
                new.append(([*indices, int(j)], (i * avg_rel + rel_j) / (i + 1), score + s[j]))
        new.sort(key=lambda beam: order * beam[2])
        beams = new[:keep]
    return np.array([b[0] for b in beams]), np.array([b[2] for b in beams])


@pytest.mark.parametrize("order", [1, -1])
def test_matches_the_reference_algorithm(order):
    h, u = _pool()
    ours = boot.beam_search(h, u, 1.2, 0.8, length=6, width=3, keep=7, order=order)
    indices, scores = reference_beam_search(h, u, 1.2, 0.8, 6, 3, 7, order)
    assert np.array_equal(ours.indices, indices)
    assert np.allclose(ours.scores, scores, atol=1e-5)


def test_scores_are_the_relational_forward_of_the_beams():
    h, u = _pool()
    beams = boot.beam_search(h, u, 0.9, 1.1, length=10, width=5, keep=12, order=1, beam_chunk=4)
    assert np.allclose(beams.scores, boot.trajectory_scores(h, u, 0.9, 1.1, beams.indices), atol=1e-5)
    assert np.allclose(beams.predictions.sum(1), beams.scores, atol=1e-5)
    assert all(len(set(row)) == 10 for row in beams.indices)
    assert np.all(np.diff(beams.scores) >= -1e-9)  # best first


def test_first_step_is_scored_by_u():
    h, u = _pool()
    beneficial = boot.beam_search(h, u, 1.0, 1.0, length=3, width=5, keep=25, order=1)
    harmful = boot.beam_search(h, u, 1.0, 1.0, length=3, width=5, keep=25, order=-1)
    assert set(beneficial.indices[:, 0]) <= set(torch.argsort(u)[:5].tolist())
    assert set(harmful.indices[:, 0]) <= set(torch.argsort(u, descending=True)[:5].tolist())


def test_t18_tails_lie_beyond_random_trajectories():
    h, u = _pool(n=200, d=16, seed=3)
    beneficial = boot.beam_search(h, u, 1.0, 1.0, length=10, width=5, keep=20, order=1)
    harmful = boot.beam_search(h, u, 1.0, 1.0, length=10, width=5, keep=20, order=-1)
    report = boot.tail_report(h, u, 1.0, 1.0, beneficial, harmful, random_trajectories=2000, seed=0)
    assert report["beneficial_below_p01"] and report["harmful_above_p99"]
    assert report["first_steps_differ_between_tails"]


def _two_opposite_groups(n=200, d=16, group=95, seed=0):
    """Nearly all of the pool in two tight, opposite groups of opposite sign (u = +0.6 along e, -0.6 along -e), as the
    demo's initial model scored its probe pool: the best trajectories open with one near-duplicate of the *other*
    sign, after which the relational factor 1 - <h_i, h_t> / tau nearly doubles every document of the tail's sign."""
    g = torch.Generator().manual_seed(seed)
    e = torch.zeros(d)
    e[0] = 1.0

    def tight(centre):
        return torch.nn.functional.normalize(centre + 0.05 * torch.randn(group, d, generator=g), dim=-1)

    rest = torch.nn.functional.normalize(torch.randn(n - 2 * group, d, generator=g), dim=-1) * 0.5
    h = torch.cat([tight(e), tight(-e), rest])
    u = torch.cat([0.6 + 0.01 * torch.randn(group, generator=g), -0.6 + 0.01 * torch.randn(group, generator=g),
                   0.1 * torch.randn(n - 2 * group, generator=g)])
    return h, u


def test_t18_needs_the_papers_two_sided_candidates_when_the_relational_term_dominates():
    """The reference code's one-sided search stays above the random trajectories' 1st percentile however many beams
    it keeps; the paper's policy (the width best toward either tail) with a wide search reaches both tails."""
    h, u = _two_opposite_groups()
    reports = {}
    for candidates, search_beams in (("tail", 0), ("tail", 1024), ("both", 1024)):
        beams = boot.search_tails(h, u, 1.0, 1.0, 10, 5, 5, candidates=candidates, search_beams=search_beams)
        assert all(len(b.indices) == 5 for b in beams.values())  # the search is wide, the output keeps 5
        reports[candidates, search_beams] = boot.tail_report(h, u, 1.0, 1.0, beams["beneficial"], beams["harmful"],
                                                             random_trajectories=2000, seed=0)
    assert not reports["tail", 0]["beneficial_below_p01"] and not reports["tail", 1024]["beneficial_below_p01"]
    assert not boot.tails_separated(reports["tail", 1024])
    assert boot.tails_separated(reports["both", 1024])
    assert reports["both", 1024]["beneficial_max"] < reports["tail", 1024]["beneficial_max"]


def test_two_sided_candidates_extend_toward_both_tails_without_repeating_rows():
    key = torch.tensor([[3.0, -1.0, 0.5, 2.0, -4.0, 1.0]])
    used = torch.tensor([[4]])  # row 4 (the smallest key) is already in the beam
    assert boot._extensions(key, used, 2, "tail").tolist() == [[1, 2]]
    assert boot._extensions(key, used, 2, "both").tolist() == [[1, 2, 0, 3]]
    assert sorted(boot._extensions(key, used, 3, "both")[0].tolist()) == [0, 1, 2, 3, 5]  # 5 left: each once
    with pytest.raises(ValueError, match="candidates must be one of"):
        boot.beam_search(*_pool(), 1.0, 1.0, length=2, width=2, keep=2, order=1, candidates="either")


def test_reference_step_zero_bug_would_fail_t18_first_step_clause():
    """With a constant step-0 score every beam of both tails starts from the same rows (the reference's bug)."""
    h, u = _pool()
    flat_u = torch.zeros_like(u)
    beneficial = boot.beam_search(h, flat_u, 1.0, 1.0, length=2, width=5, keep=5, order=1)
    harmful = boot.beam_search(h, flat_u, 1.0, 1.0, length=2, width=5, keep=5, order=-1)
    report = boot.tail_report(h, flat_u, 1.0, 1.0, beneficial, harmful, random_trajectories=50, seed=0)
    assert not report["first_steps_differ_between_tails"]


def test_bad_arguments_are_clear_errors():
    h, u = _pool(n=5)
    with pytest.raises(ValueError, match="exceeds the probe pool"):
        boot.beam_search(h, u, 1.0, 1.0, length=6, width=2, keep=2, order=1)
    with pytest.raises(ValueError, match="order must be"):
        boot.beam_search(h, u, 1.0, 1.0, length=2, width=2, keep=2, order=0)


def test_search_tails_table_and_check():
    h, u = _pool()
    beams = boot.search_tails(h, u, 0.5, 2.0, length=4, width=3, keep=2)
    assert list(beams) == ["beneficial", "harmful"]
    for tail, order in boot.TAILS.items():
        expected = boot.beam_search(h, u, 0.5, 2.0, 4, 3, 2, order)
        np.testing.assert_array_equal(beams[tail].indices, expected.indices)
    ids = [f"c{i}" for i in range(len(u))]
    table = boot.trajectories_table(beams, 2, ids)
    assert table.column_names == ["row", "policy", "context_index", "context_id", "predicted_score",
                                  "predicted_marginal"]
    assert table.column("row").to_pylist() == [0, 1, 2, 3]
    assert table.column("policy").to_pylist() == ["bootstrap-beneficial"] * 2 + ["bootstrap-harmful"] * 2
    assert table.column("context_index").to_pylist()[2] == beams["harmful"].indices[0].tolist()
    assert table.column("context_id").to_pylist()[0] == [ids[i] for i in beams["beneficial"].indices[0]]
    assert table.column("predicted_score").to_pylist()[1] == float(beams["beneficial"].scores[1])
    report = {"beneficial_below_p01": True, "harmful_above_p99": True, "first_steps_differ_between_tails": True}
    assert boot.tails_separated(report) is True
    assert boot.tails_separated({**report, "harmful_above_p99": False}) is False


def test_random_score_histogram_spans_the_beams_and_counts_every_trajectory():
    h, u = _pool()
    beams = boot.search_tails(h, u, 0.5, 2.0, length=4, width=3, keep=2)
    edges, counts = boot.random_score_histogram(h, u, 0.5, 2.0, beams, length=4, seed=7)
    assert len(edges) == 31 and len(counts) == 30 and sum(counts) == 500
    scores = np.concatenate([beams["beneficial"].scores, beams["harmful"].scores])
    assert edges[0] <= scores.min() and edges[-1] >= scores.max()
    assert sum(c > 0 for c in counts) > 1, "the random trajectories must be different samples, not one repeated"
    assert boot.random_score_histogram(h, u, 0.5, 2.0, beams, length=4, seed=7) == (edges, counts)  # seeded


def test_validation_split_holds_out_whole_bootstrap_trajectories_from_both_tails():
    """method.md 3.5: the split is over trajectories. The tails' beams share their roots, so a split by root held
    out one root's beams: one tail only. Per tail, a share of whole trajectories goes to validation instead."""
    h, u = _pool()
    beams = boot.search_tails(h, u, 1.0, 1.0, length=6, width=5, keep=10)
    table = boot.trajectories_table(beams, 10, [f"c{i}" for i in range(len(u))])
    assert all(len(set(beams[tail].indices[:, 0])) <= 2 for tail in boot.TAILS)  # ten beams, at most two roots
    data = tr.Trajectories(np.array(table.column("context_index").to_pylist()), np.zeros((20, 6)),
                           np.array(table.column("policy").to_pylist(), dtype=object),
                           np.array(table.column("row").to_pylist()))
    train, val = tr.split_by_group(data, 0.3, seed=5)
    assert sorted(data.policy[val]) == ["bootstrap-beneficial"] * 3 + ["bootstrap-harmful"] * 3
    assert set(data.policy[train]) == {"bootstrap-beneficial", "bootstrap-harmful"}
    assert set(train).isdisjoint(val) and sorted([*train, *val]) == list(range(20))
    assert all(np.array_equal(a, b) for a, b in zip((train, val), tr.split_by_group(data, 0.3, seed=5), strict=True))
    reversed_rows = np.arange(20)[::-1]
    _, val_reversed = tr.split_by_group(data.subset(reversed_rows), 0.3, seed=5)
    assert sorted(reversed_rows[val_reversed]) == val.tolist()  # the same trajectories, whatever the row order
