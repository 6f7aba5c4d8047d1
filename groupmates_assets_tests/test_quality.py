"""fastText quality classifier: AUC, training, scoring, thresholds, splits."""

from __future__ import annotations

import numpy as np
import pytest

from groupmates_assets.lib import quality
from groupmates_assets.lib.pool_sample import SampledDoc
from groupmates_assets_tests.conftest import bad_texts, good_texts

pytestmark = pytest.mark.unit


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 200), rng.normal(0, 1, 300)
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert quality.roc_auc(pos, neg) == pytest.approx(pairwise)
    assert quality.roc_auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert quality.roc_auc(np.array([2.0]), np.array([1.0])) == 1.0


def test_normalization_joins_lines_like_dclm():
    assert quality.normalize_for_fasttext("  a\nb\r\nc  \n") == "a b c"


def test_train_score_and_heldout_metrics(tmp_path):
    model = str(tmp_path / "m.bin")
    report = quality.train_quality_classifier(
        good_texts(300), bad_texts(300), model, quality.FastTextRecipe(epoch=10),
        heldout_positives=[t.replace("Section", "Part") for t in good_texts(40)],
        heldout_negatives=[t.replace("ref", "id") for t in bad_texts(40)],
    )
    assert report.heldout_auc > 0.95 and report.heldout_accuracy > 0.9
    assert (report.positives_train, report.negatives_heldout) == (300, 40)
    classifier = quality.QualityClassifier(model)
    scores = classifier.score([good_texts(1)[0], bad_texts(1)[0]])
    assert scores.dtype == np.float32 and scores[0] > 0.5 > scores[1]
    again = quality.train_quality_classifier(good_texts(300), bad_texts(300), str(tmp_path / "m2.bin"),
                                             quality.FastTextRecipe(epoch=10))
    assert again.model_sha256 == report.model_sha256  # single-threaded training is deterministic


def test_supplied_model_without_a_known_label_is_refused(tmp_path):
    model = str(tmp_path / "m.bin")
    quality.train_quality_classifier(good_texts(50), bad_texts(50), model)
    with pytest.raises(ValueError, match="known high-quality label"):
        quality.QualityClassifier(model, hq_label="__label__nope")


def test_threshold_for_keep_fraction():
    scores = np.arange(100) / 100
    threshold = quality.threshold_for_keep_fraction(scores, 0.3)
    assert (scores >= threshold).sum() == 30
    with pytest.raises(ValueError):
        quality.threshold_for_keep_fraction(scores, 0.0)


def test_heldout_split_is_stable_under_reordering():
    items = [f"doc-{i}" for i in range(1000)]
    train, held = quality.split_heldout(items, str, 0.2, seed=1)
    train_r, held_r = quality.split_heldout(items[::-1], str, 0.2, seed=1)
    assert set(held) == set(held_r) and set(train) == set(train_r) and 150 < len(held) < 250


class _FixedScores:
    """A classifier stand-in that scores documents by a table, to check calibration arithmetic alone."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def score(self, texts):
        return np.array([self.scores[t] for t in texts], dtype=np.float32)


def _docs(*rows: tuple[str, str | None]) -> list[SampledDoc]:
    return [SampledDoc(doc_id=text, text=text, group=group) for text, group in rows]


def test_calibration_with_a_fixed_threshold_counts_keeps_by_group():
    sample = _docs(("a", "wiki"), ("b", "wiki"), ("c", None), ("d", "web"))
    classifier = _FixedScores({"a": 0.9, "b": 0.1, "c": 0.6, "d": 0.4})
    result = quality.calibrate(classifier, sample, threshold=0.5, keep_fraction=None)
    assert result == {
        "threshold": 0.5, "threshold_rule": "fixed threshold 0.5", "calibration_documents": 4,
        "calibration_keep_rate": 0.5,
        "calibration_by_group": {"(none)": {"in": 1, "kept": 1}, "web": {"in": 1, "kept": 0},
                                 "wiki": {"in": 2, "kept": 1}},
    }
    assert list(result["calibration_by_group"]) == ["(none)", "web", "wiki"]


def test_calibration_by_keep_fraction_and_an_empty_sample():
    sample = _docs(*((str(i), "g") for i in range(10)))
    classifier = _FixedScores({str(i): i / 10 for i in range(10)})
    result = quality.calibrate(classifier, sample, threshold=None, keep_fraction=0.3)
    assert result["threshold"] == pytest.approx(0.7)
    assert result["threshold_rule"] == "keep fraction 0.3 of 10 held-out pool documents"
    assert result["calibration_keep_rate"] == pytest.approx(0.3)
    empty = quality.calibrate(classifier, [], threshold=0.2, keep_fraction=None)
    assert empty["calibration_keep_rate"] is None and empty["calibration_by_group"] == {}
    with pytest.raises(ValueError, match="threshold or a keep_fraction"):
        quality.calibrate(classifier, sample, threshold=None, keep_fraction=None)


def test_classifier_manifest_keeps_its_key_order_and_leaves_out_heldout_scores():
    report = quality.TrainingReport(3, 4, 1, 2, 0.75, 0.8, "abc", [0.9], [0.1])
    manifest = quality.classifier_manifest("v1", "quality/classifier/v1/model.bin", "sha", quality.HQ_LABEL,
                                           {"threshold": 0.5, "threshold_rule": "r"}, {"recipe": "x"}, report,
                                           ["s-0"], [])
    assert list(manifest) == ["version", "model", "model_sha256", "hq_label", "threshold", "threshold_rule",
                              "training", "metrics", "negative_sample_shards", "unreadable_shards"]
    assert manifest["metrics"] == {"positives_train": 3, "negatives_train": 4, "positives_heldout": 1,
                                   "negatives_heldout": 2, "heldout_accuracy": 0.75, "heldout_auc": 0.8,
                                   "model_sha256": "abc"}
    supplied = quality.classifier_manifest("v1", "m", "sha", "__label__1", {}, {"supplied_model": "x"}, None, [], [])
    assert supplied["metrics"] is None


def test_train_on_samples_holds_out_by_doc_id(tmp_path):
    positives = [SampledDoc(f"p{i}", t, "wiki") for i, t in enumerate(good_texts(60))]
    negatives = [SampledDoc(f"n{i}", t, "web") for i, t in enumerate(bad_texts(60))]
    recipe = quality.FastTextRecipe(epoch=5)
    report, held = quality.train_on_samples(positives, negatives, str(tmp_path / "m.bin"), recipe, 0.25)
    _, expected = quality.split_heldout(negatives, lambda d: d.doc_id, 0.25, recipe.seed)
    assert held == expected and report.negatives_heldout == len(held)
    assert report.positives_train + report.positives_heldout == len(positives)
