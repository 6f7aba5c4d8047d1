"""fastText quality classifier: AUC, training, scoring, thresholds, splits."""

from __future__ import annotations

import numpy as np
import pytest

from groupmates_assets.lib import quality
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
