"""Training the influence model: splits, statistics, metrics, learning a planted relational signal, and T6 (alpha and
tau trained by the trainer's own optimizer)."""

import itertools

import numpy as np
import pytest
import torch

from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import learning_curve as lc
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.influence import training as tr

pytestmark = pytest.mark.unit


def _trajectories(policies, contexts, labels=None):
    contexts = np.asarray(contexts)
    labels = np.zeros(contexts.shape) if labels is None else labels
    return tr.Trajectories(contexts, labels, np.array(policies, dtype=object), np.arange(len(contexts)))


def test_split_holds_out_whole_trajectories_of_every_policy_and_random_split_is_stable():
    rng = np.random.default_rng(0)
    random_rows = [rng.choice(100, 10, replace=False) for _ in range(20)]
    bootstrap_rows = [[r, *rng.choice(np.setdiff1d(np.arange(100), [r]), 9, replace=False)] for r in [5] * 5 + [9] * 5]
    only_random = _trajectories(["random"] * 20, random_rows)
    both = _trajectories(["random"] * 20 + ["bootstrap-beneficial"] * 5 + ["bootstrap-harmful"] * 5,
                         random_rows + bootstrap_rows)
    train, val = tr.split_by_group(both, 0.25, seed=7)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(both)
    assert [int((both.policy[val] == p).sum()) for p in ("random", "bootstrap-beneficial", "bootstrap-harmful")] \
        == [5, 1, 1]  # round(0.25 x 20) and at least one of each tail
    _, val_random_only = tr.split_by_group(only_random, 0.25, seed=7)
    assert np.array_equal(val[val < 20], val_random_only)  # the random held-out set ignores the bootstrap data
    assert not np.array_equal(val_random_only, tr.split_by_group(only_random, 0.25, seed=8)[1])  # seeded
    assert len(tr.split_by_group(both, 0.0, seed=7)[1]) == 0
    assert tr.split_fingerprint(only_random) == {}  # a random-only model keeps its fingerprint
    assert tr.split_fingerprint(both) == {"bootstrap_split": tr.BOOTSTRAP_SPLIT}


def test_learning_curve_subsets_are_nested_seeded_and_keep_every_policy():
    data = _trajectories(["random"] * 40 + ["bootstrap-beneficial"] * 8 + ["bootstrap-harmful"] * 8,
                         np.zeros((56, 3), dtype=np.int64))
    train, val = tr.split_by_group(data, 0.25, seed=0)
    subsets = lc.nested_subsets(data, train, [0.5, 0.25], seed=3)
    assert list(subsets) == [0.25, 0.5]
    assert set(subsets[0.25]) < set(subsets[0.5]) < set(train) and set(subsets[0.5]).isdisjoint(val)
    for fraction, rows in subsets.items():
        for policy in set(data.policy):
            in_train = int((data.policy[train] == policy).sum())
            assert int((data.policy[rows] == policy).sum()) == max(1, round(fraction * in_train))
    again = lc.nested_subsets(data, train[::-1], [0.25, 0.5], seed=3)
    assert all(np.array_equal(subsets[f], again[f]) for f in subsets)  # seeded, independent of the row order
    assert not np.array_equal(subsets[0.5], lc.nested_subsets(data, train, [0.5], seed=4)[0.5])
    for bad in ([1.0], [0.0], [0.5, 0.5]):
        with pytest.raises(ValueError, match="learning-curve fractions"):
            lc.nested_subsets(data, train, bad, seed=3)


def test_spearman_and_pearson_match_known_values():
    assert tr.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert tr.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert tr.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy's value
    assert np.isnan(tr.pearson([1, 1, 1], [1, 2, 3]))
    metrics = tr.regression_metrics(np.zeros(4), np.array([1.0, -1.0, 1.0, -1.0]))
    assert metrics["mse"] == metrics["mse_constant"] == 1.0


def test_schedule_warms_up_then_decays_to_zero():
    factors = [tr.lr_factor(s, 4, 20) for s in range(20)]
    assert factors[0] == 0.25 and factors[3] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert tr.lr_factor(20, 4, 20) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def planted():
    """Real text, and labels from a fixed relational teacher on the pretrained encoder's own embeddings."""
    topics = ["the heart pumps blood through arteries and veins", "sql databases store rows in tables",
              "the orchestra played a symphony by beethoven", "rain forms when water vapour condenses",
              "the striker scored a goal in the final minute", "compilers turn source code into machine code"]
    texts = [f"{topic}. note {i}: {' '.join(topic.split()[i % 4:])}" for i in range(8) for topic in topics]
    source = enc.resolve_encoder(None)
    docs = enc.chunk_documents(enc.load_encoder_tokenizer(source), texts, chunk_len=16, chunks=2)
    torch.manual_seed(0)
    teacher = im.build_model(source, im.InfluenceModelConfig(chunk_len=16, chunks=2, encoder_layers=1)).eval()
    with torch.no_grad():
        h = teacher.embed(docs, np.arange(len(docs)))
        u_true = torch.tensor([(i % 6) - 2.5 for i in range(len(texts))], dtype=torch.float32)  # by topic
        rng = np.random.default_rng(0)
        contexts = np.stack([rng.choice(len(texts), 6, replace=False) for _ in range(60)])
        labels = im.relational_predictions(h[contexts], u_true[contexts], 1.0, 1.0).numpy().astype(np.float64)
    data = tr.Trajectories(contexts, labels, np.array(["random"] * 60, dtype=object), np.arange(60))
    return source, docs, data


def test_trained_model_beats_a_constant_predictor_on_held_out_trajectories(planted):
    source, docs, data = planted
    train, val = tr.split_by_group(data, 0.25, seed=0)
    torch.manual_seed(0)
    model = im.build_model(source, im.InfluenceModelConfig(chunk_len=16, chunks=2, encoder_layers=1))
    result = tr.train_model(model, docs, data, train, val, tr.TrainSettings(
        lr=1e-3, epochs=8, trajectories_per_step=8, warmup_steps=2, evals_per_epoch=1, seed=0))
    assert model.config.label_mean == pytest.approx(data.labels[train].mean())  # statistics from train only
    assert model.config.label_std == pytest.approx(data.labels[train].std())
    assert result.best_metrics["spearman"] > 0.5
    assert result.best_metrics["mse"] < 0.8 * result.best_metrics["mse_constant"]
    assert result.best_metrics == tr.evaluate(model, docs, data, val)  # the best weights are the ones kept
    assert len(result.history) == 8 and result.trajectories_per_second > 0


def _alpha_tau_trained(source, docs, data) -> tuple[bool, bool]:
    """T6 as two verdicts on a short run of the trainer itself: (alpha and tau are parameters of the optimizer
    train_model built, both left their initial 1.0 at every evaluation and at the end)."""
    model = im.build_model(source, im.InfluenceModelConfig(chunk_len=16, chunks=2, encoder_layers=1), seed=0)
    result = tr.train_model(model, docs, data, np.arange(len(data)), np.array([], dtype=np.int64), tr.TrainSettings(
        lr=1e-2, epochs=1, trajectories_per_step=20, warmup_steps=1, seed=0))
    held = {"alpha", "tau"} <= set(result.optimized_parameters)
    moved = bool(result.history) and all(e["alpha"] != 1.0 and e["tau"] != 1.0 for e in result.history) \
        and 1.0 not in model.alpha_tau()
    return held, moved


def test_t6_the_trainers_optimizer_holds_alpha_and_tau_and_moves_them(planted, monkeypatch):
    source, docs, data = planted
    assert _alpha_tau_trained(source, docs, data) == (True, True)
    # an optimizer that leaves them out: the same verdicts must then fail
    monkeypatch.setattr(tr, "_optimizer", lambda model, settings: torch.optim.AdamW(
        [p for name, p in model.named_parameters() if name not in ("alpha", "tau")], lr=settings.lr))
    assert _alpha_tau_trained(source, docs, data) == (False, False)


def test_learning_curve_trains_fresh_models_on_subsets_and_reuses_the_trained_one_at_full(planted):
    source, docs, data = planted
    train, val = tr.split_by_group(data, 0.25, seed=0)
    settings = tr.TrainSettings(lr=1e-3, epochs=2, trajectories_per_step=8, warmup_steps=1, seed=0)
    built = []

    def new_model():
        built.append(im.build_model(source, im.InfluenceModelConfig(chunk_len=16, chunks=2, encoder_layers=1), seed=0))
        return built[-1]

    trained = {"all_val": {"spearman": 0.125, "mse": 0.5}, "random_val": {"spearman": 0.25}}
    points = lc.learning_curve(new_model, docs, data, train, val, [0.5, 0.25], settings, trained)
    assert [p["fraction"] for p in points] == [0.25, 0.5, 1.0] and len(built) == 2  # nothing trained at 100%
    assert [p["trajectories"] for p in points] == [round(0.25 * len(train)), round(0.5 * len(train)), len(train)]
    assert points[-1]["all_val"] is trained["all_val"] and points[-1]["retrained"] is False
    subsets = lc.nested_subsets(data, train, [0.25, 0.5], seed=0)
    for model, point, rows in zip(built, points[:2], subsets.values(), strict=True):
        assert model.config.label_mean == pytest.approx(data.labels[rows].mean())  # trained on its subset only
        assert point["all_val"] == tr.evaluate(model, docs, data, val)  # scored on the fixed validation split
        assert point["random_val"] == point["all_val"]  # every trajectory here is a random one
    lines = lc.curves_markdown({"influence_model_final": points}).splitlines()
    assert len(lines) == 5 and lines[-1] == (f"| influence_model_final | 100% | {len(train)} | 0.1250 | 0.2500 | "
                                             "0.5000 | 0.0 |")
    assert lc.curves_png({"influence_model_final": points}).startswith(b"\x89PNG")


def test_empty_training_split_is_a_clear_error(planted):
    source, docs, data = planted
    model = im.build_model(source, im.InfluenceModelConfig(chunk_len=16, chunks=2, encoder_layers=1))
    with pytest.raises(ValueError, match="training split is empty"):
        tr.train_model(model, docs, data, np.array([], dtype=np.int64), np.arange(3), tr.TrainSettings())


def test_trajectories_from_oracle_tables_reject_bad_labels():
    import pyarrow as pa

    table = pa.table({"trajectory_id": [0], "policy": ["random"], "context_index": [[1, 2]],
                      "marginal": [[0.1, float("nan")]]})
    with pytest.raises(ValueError, match="non-finite"):
        tr.Trajectories.from_tables([table])
    with pytest.raises(ValueError, match="no oracle trajectories"):
        tr.Trajectories.from_tables([])


def test_comparison_markdown_rows_in_order_with_nan_for_missing_metrics():
    results = {
        "influence_model_init": {"random_val": {"spearman": 0.5, "pearson": 0.25}, "all_val": {"spearman": 0.125},
                                 "alpha": 1.0, "tau": 2.0},
        "influence_model_final": {"random_val": {}, "all_val": {"mse": 0.5, "mse_constant": 1.0}, "alpha": 0.5,
                                  "tau": 1.5},
    }
    lines = tr.comparison_markdown(results).splitlines()
    assert lines[0].startswith("| model | Spearman (random held-out) |") and len(lines) == 4
    assert lines[2] == "| influence_model_init | 0.5000 | 0.2500 | 0.1250 | nan | nan | 1.000 | 2.000 |"
    assert lines[3] == "| influence_model_final | nan | nan | nan | 0.5000 | 1.0000 | 0.500 | 1.500 |"
