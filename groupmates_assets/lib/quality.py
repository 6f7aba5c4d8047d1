"""DCLM-style fastText quality classifier: bigram model, high-quality positives vs negatives from the pool.

DCLM trained `openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin` on instruction/ELI5 positives against
RefinedWeb documents, and keeps a page iff P(high quality) >= 0.018112, scoring the text with its lines
joined by spaces. The same recipe is reproduced here on whatever positives and pool are configured, or a
user-supplied ``.bin`` (for example DCLM's own model) is loaded as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

from groupmates_assets.lib.pool_sample import SampledDoc

HQ_LABEL = "__label__hq"
LQ_LABEL = "__label__cc"
# Label names used by DCLM's released classifier, so its .bin can be used directly.
KNOWN_HQ_LABELS = (HQ_LABEL, "__label__1", "__label__hq_text")
T = TypeVar("T")


@dataclass(frozen=True)
class FastTextRecipe:
    """Training hyper-parameters; recorded with the model so it can be rebuilt exactly."""

    word_ngrams: int = 2  # bigrams, as DCLM
    dim: int = 64
    epoch: int = 5
    lr: float = 0.1
    min_count: int = 2
    bucket: int = 200_000  # hashed n-gram buckets; fastText's 2M default makes a 0.5 GB model at dim 64
    threads: int = 1  # one thread makes fastText training deterministic
    seed: int = 1234

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def normalize_for_fasttext(text: str) -> str:
    """DCLM joins a page's lines with spaces before scoring; fastText reads one example per line."""
    return " ".join(text.strip().splitlines())


def _load_fasttext():
    import fasttext

    fasttext.FastText.eprint = lambda *args, **kwargs: None  # silence the load-time deprecation banner
    return fasttext


class QualityClassifier:
    """A loaded fastText model that scores texts with P(high quality)."""

    def __init__(self, model_path: str, hq_label: str | None = None):
        self.model = _load_fasttext().load_model(model_path)
        labels = list(self.model.get_labels())
        if hq_label is None:
            hq_label = next((label for label in KNOWN_HQ_LABELS if label in labels), None)
        if hq_label not in labels:
            raise ValueError(
                f"fastText model {model_path} has labels {labels}; none is a known high-quality label "
                f"({list(KNOWN_HQ_LABELS)}): set the high-quality label name in config"
            )
        self.hq_label = hq_label
        self.num_labels = len(labels)

    def score_normalized(self, texts: Sequence[str]) -> np.ndarray:
        """P(high quality) for texts already normalised with :func:`normalize_for_fasttext`."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        # fastText's own predict() re-checks every text for newlines; normalised texts have none.
        labels, probs = self.model.f.multilinePredict([t + "\n" for t in texts], self.num_labels, 0.0, "strict")
        probs = np.asarray(probs, dtype=np.float32).reshape(len(texts), self.num_labels)
        hq = self.hq_label
        column = np.fromiter((row.index(hq) for row in labels), dtype=np.intp, count=len(texts))
        return np.clip(probs[np.arange(len(texts)), column], 0.0, 1.0)

    def score(self, texts: Iterable[str]) -> np.ndarray:
        return self.score_normalized([normalize_for_fasttext(t) for t in texts])


@dataclass(frozen=True)
class TrainingReport:
    positives_train: int
    negatives_train: int
    positives_heldout: int
    negatives_heldout: int
    heldout_accuracy: float
    heldout_auc: float
    model_sha256: str
    heldout_scores_hq: list[float]
    heldout_scores_lq: list[float]


def roc_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic; ties count one half."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs at least one positive and one negative example")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg_rank, counts)
    rank_sum = ranks[: len(pos)].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def split_heldout(
    items: Sequence[T], key: Callable[[T], str], heldout_fraction: float, seed: int
) -> tuple[list[T], list[T]]:
    """Deterministic train/held-out split by a seeded hash of each item's key (stable under reordering)."""
    train: list[T] = []
    heldout: list[T] = []
    threshold = int(heldout_fraction * 2**32)
    salt = str(seed).encode()[:16]
    for item in items:
        digest = hashlib.blake2b(key(item).encode("utf-8", "surrogatepass"), digest_size=4, salt=salt).digest()
        (heldout if int.from_bytes(digest, "big") < threshold else train).append(item)
    return train, heldout


_TRAIN_SCRIPT = (
    "import json, sys\n"
    "import fasttext\n"
    "job = json.loads(sys.argv[1])\n"
    "fasttext.train_supervised(**job['options']).save_model(job['output'])\n"
)


def _train_in_fresh_process(train_file: str, model_path: str, recipe: FastTextRecipe) -> None:
    """Run fastText training in a new interpreter.

    Single-threaded fastText training is deterministic, but only in a clean process: the first training after
    torch's CPU kernels ran in the same process was seen to give a different model. A fresh interpreter makes
    the model a function of the data and the recipe alone (and keeps a C++ crash out of the caller).
    """
    options = {"input": train_file, "wordNgrams": recipe.word_ngrams, "dim": recipe.dim, "epoch": recipe.epoch,
               "lr": recipe.lr, "minCount": recipe.min_count, "bucket": recipe.bucket, "thread": recipe.threads,
               "seed": recipe.seed, "verbose": 0}
    job = json.dumps({"options": options, "output": model_path})
    done = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, job], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not os.path.exists(model_path):
        raise RuntimeError(f"fastText training failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


def train_quality_classifier(
    positives: Sequence[str],
    negatives: Sequence[str],
    model_path: str,
    recipe: FastTextRecipe | None = None,
    heldout_positives: Sequence[str] = (),
    heldout_negatives: Sequence[str] = (),
) -> TrainingReport:
    """Train the bigram classifier on (positives, negatives), write it to ``model_path``, evaluate on held-out."""
    recipe = recipe or FastTextRecipe()
    if not positives or not negatives:
        raise ValueError(f"need positives and negatives to train (got {len(positives)} and {len(negatives)})")
    pos_train = [normalize_for_fasttext(t) for t in positives]
    neg_train = [normalize_for_fasttext(t) for t in negatives]
    pos_held = [normalize_for_fasttext(t) for t in heldout_positives]
    neg_held = [normalize_for_fasttext(t) for t in heldout_negatives]
    rng = np.random.default_rng(recipe.seed)
    examples = [f"{HQ_LABEL} {t}" for t in pos_train] + [f"{LQ_LABEL} {t}" for t in neg_train]
    examples = [examples[i] for i in rng.permutation(len(examples))]
    with tempfile.TemporaryDirectory(prefix="groupmates-fasttext-") as tmp:
        train_file = os.path.join(tmp, "train.txt")
        with open(train_file, "w", encoding="utf-8") as handle:
            handle.write("\n".join(examples) + "\n")
        os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
        _train_in_fresh_process(train_file, model_path, recipe)
    classifier = QualityClassifier(model_path, HQ_LABEL)
    hq_scores = classifier.score_normalized(pos_held)
    lq_scores = classifier.score_normalized(neg_held)
    correct = int((hq_scores >= 0.5).sum() + (lq_scores < 0.5).sum())
    total = len(hq_scores) + len(lq_scores)
    with open(model_path, "rb") as handle:
        sha = hashlib.sha256(handle.read()).hexdigest()
    return TrainingReport(
        positives_train=len(pos_train),
        negatives_train=len(neg_train),
        positives_heldout=len(pos_held),
        negatives_heldout=len(neg_held),
        heldout_accuracy=correct / total if total else float("nan"),
        heldout_auc=roc_auc(hq_scores, lq_scores) if len(hq_scores) and len(lq_scores) else float("nan"),
        model_sha256=sha,
        heldout_scores_hq=hq_scores.tolist(),
        heldout_scores_lq=lq_scores.tolist(),
    )


def threshold_for_keep_fraction(pool_scores: np.ndarray, keep_fraction: float) -> float:
    """The score threshold that keeps ``keep_fraction`` of a pool sample (score >= threshold is kept)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if len(pool_scores) == 0:
        raise ValueError("cannot derive a threshold from an empty pool sample")
    return float(np.quantile(np.asarray(pool_scores, dtype=np.float64), 1.0 - keep_fraction, method="higher"))


def train_on_samples(positives: Sequence[SampledDoc], negatives: Sequence[SampledDoc], model_path: str,
                     recipe: FastTextRecipe, heldout_fraction: float) -> tuple[TrainingReport, list[SampledDoc]]:
    """Hold out a share of positives and pool negatives (by doc_id, so a rerun holds out the same documents), train
    on the rest and evaluate; returns the report and the held-out negatives, the unseen pool sample the threshold
    is calibrated on."""
    pos_train, pos_held = split_heldout(positives, _doc_id, heldout_fraction, recipe.seed)
    neg_train, neg_held = split_heldout(negatives, _doc_id, heldout_fraction, recipe.seed)
    report = train_quality_classifier(
        [d.text for d in pos_train], [d.text for d in neg_train], model_path, recipe,
        [d.text for d in pos_held], [d.text for d in neg_held],
    )
    return report, neg_held


def _doc_id(doc: SampledDoc) -> str:
    return doc.doc_id


def calibrate(classifier: QualityClassifier, sample: Sequence[SampledDoc], threshold: float | None,
              keep_fraction: float | None) -> dict[str, Any]:
    """Threshold (given, or placed at the keep-fraction quantile of a pool sample) and keep rates by group."""
    scores = classifier.score([d.text for d in sample]) if sample else np.zeros(0, np.float32)
    if threshold is not None:
        threshold, rule = float(threshold), f"fixed threshold {threshold}"
    elif keep_fraction is not None:
        threshold = threshold_for_keep_fraction(scores, keep_fraction)
        rule = f"keep fraction {keep_fraction} of {len(sample)} held-out pool documents"
    else:
        raise ValueError("quality settings need a threshold or a keep_fraction")
    groups: dict[str, list[int]] = {}
    for doc, score in zip(sample, scores.tolist(), strict=True):
        counts = groups.setdefault(doc.group or "(none)", [0, 0])
        counts[0] += 1
        counts[1] += score >= threshold
    return {"threshold": threshold, "threshold_rule": rule, "calibration_documents": len(sample),
            "calibration_keep_rate": float((scores >= threshold).mean()) if len(scores) else None,
            "calibration_by_group": {g: {"in": c[0], "kept": c[1]} for g, c in sorted(groups.items())}}


def classifier_manifest(version: str, model: str, model_sha256: str, hq_label: str, calibration: dict[str, Any],
                        training: dict[str, Any], report: TrainingReport | None, sample_shards: list[str],
                        unreadable_shards: list[str]) -> dict[str, Any]:
    """The classifier's ``classifier.json`` (and current pointer): what every filtered shard is scored with."""
    return {
        "version": version, "model": model, "model_sha256": model_sha256, "hq_label": hq_label, **calibration,
        "training": training,
        "metrics": None if report is None else {
            k: v for k, v in report.__dict__.items() if not k.startswith("heldout_scores")},
        "negative_sample_shards": sample_shards,
        "unreadable_shards": unreadable_shards,
    }
