"""Tests for few-shot prompts (DCLM's shots per task) and the user's own task files in LLM Foundry's ICL format:
parsing of each task type with the file, line and field of a bad line, demonstrations that never include the scored
item, the prompt format, greedy accuracy of language-modeling tasks on a model whose answer is known, and a profile
whose task files are evaluated beside the built-in tasks."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from groupmates_assets.defs.common import PermanentFailure
from groupmates_assets.defs.evaluation.assets import load_icl_tasks
from groupmates_assets.lib import evaluation as ev
from groupmates_assets.lib import fewshot as fs
from groupmates_assets.lib import icl_tasks as icl
from groupmates_assets.lib import lm
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.storage import Storage
from groupmates_assets.settings import PROFILES, EvalProfile, IclTask

pytestmark = pytest.mark.unit

MC_LINES = [
    {"query": "Question: What colour is the sky?", "choices": ["blue", "green"], "gold": 0},
    {"query": "Question: How many legs has a cat?", "choices": ["two", "four", "six"], "gold": 1},
    {"query": "Question: Which is a fruit?", "choices": ["apple", "stone"], "gold": 0},
    {"query": "Question: What do bees make?", "choices": ["milk", "honey"], "gold": 1},
]
SCHEMA_LINES = [
    {"context_options": ["The trophy did not fit because the trophy", "The trophy did not fit because the case"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["Anna thanked Mary because Anna", "Anna thanked Mary because Mary"],
     "continuation": "had helped her.", "gold": 1},
]
LM_LINES = [
    {"context": "Repeat the word: the the", "continuation": "the the the"},
    {"context": "The animal with stripes is the", "continuation": "zebra"},
    {"context": "Say it again:", "continuation": "the"},
]


@pytest.fixture(autouse=True)
def _threads():
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


def _write(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _config(path: Path | str, task_type: str, name: str = "mine", **kwargs) -> IclTask:
    return IclTask(name=name, path=str(path), task_type=task_type, **kwargs)


def _biased(model: torch.nn.Module, token_id: int, bias: float) -> torch.nn.Module:
    """A copy whose output head adds `bias` to one token's logit, so that token is the argmax everywhere."""
    biased = copy.deepcopy(model)
    old = biased.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[token_id] = bias
    biased.set_output_embeddings(head)
    return biased


# --- parsing ----------------------------------------------------------------------------------------------------


def test_multiple_choice_file_parses_as_llm_foundry_prompts(tmp_path: Path) -> None:
    path = _write(tmp_path / "mc.jsonl", [MC_LINES[0], "", {**MC_LINES[1], "query": "  " + MC_LINES[1]["query"]}])
    task = icl.load_icl_task(_config(path, "multiple_choice"))
    assert [item.line for item in task.items] == [1, 3]  # blank line 2 skipped, numbering kept
    first, second = (item.example for item in task.items)
    assert first.context == "Question: What colour is the sky?" and first.choices == [" blue", " green"]
    assert second.context == "Question: How many legs has a cat?" and second.gold == 1 and second.row == 3
    assert task.items[1].demonstration == "Question: How many legs has a cat? four"
    assert task.baseline() == pytest.approx((1 / 2 + 1 / 3) / 2)
    delimited = icl.load_icl_task(_config(path, "multiple_choice", continuation_delimiter="\nAnswer: "))
    assert delimited.items[0].example.context == "Question: What colour is the sky?\nAnswer:"
    assert delimited.items[0].demonstration == "Question: What colour is the sky?\nAnswer: blue"


def test_schema_and_language_modeling_files_parse(tmp_path: Path) -> None:
    schema = icl.load_icl_task(_config(_write(tmp_path / "s.jsonl", SCHEMA_LINES), "schema"))
    example = schema.items[1].example
    assert example.choice_contexts == tuple(SCHEMA_LINES[1]["context_options"])
    assert example.choices == [" had helped her."] * 2 and example.gold == 1
    assert schema.items[1].demonstration == "Anna thanked Mary because Mary had helped her."
    modeling = icl.load_icl_task(_config(_write(tmp_path / "l.jsonl", LM_LINES), "language_modeling"))
    assert modeling.items[1].context == "The animal with stripes is the"
    assert modeling.items[1].continuation == " zebra" and modeling.baseline() == 0.0


@pytest.mark.parametrize(("task_type", "bad", "field", "problem"), [
    ("multiple_choice", '{"query": "q", "choices": ["a", "b"], "gold": 1', None, "invalid JSON"),
    ("multiple_choice", '["q", ["a", "b"], 0]', None, "must be a JSON object"),
    ("multiple_choice", {"choices": ["a", "b"], "gold": 0}, "query", "missing"),
    ("multiple_choice", {"query": "q", "choices": ["a", "b"], "gold": 2}, "gold", "out of range"),
    ("multiple_choice", {"query": "q", "choices": ["a", "b"], "gold": "0"}, "gold", "must be an integer"),
    ("multiple_choice", {"query": "q", "choices": "a b", "gold": 0}, "choices", "list of strings"),
    ("multiple_choice", {"query": 3, "choices": ["a", "b"], "gold": 0}, "query", "must be a string"),
    ("schema", {"context_options": ["a", "b"], "gold": 0}, "continuation", "missing"),
    ("schema", {"context_options": ["a"], "continuation": "c", "gold": 0}, "context_options", "at least 2"),
    ("schema", {"context_options": ["a", "b"], "continuation": "c", "gold": -1}, "gold", "out of range"),
    ("language_modeling", {"context": "c"}, "continuation", "missing"),
    ("language_modeling", {"context": "c", "continuation": "  "}, "continuation", "must not be empty"),
    ("language_modeling", {"context": ["c"], "continuation": "x"}, "context", "must be a string"),
])
def test_bad_lines_name_file_line_and_field(tmp_path: Path, task_type: str, bad, field: str | None,
                                            problem: str) -> None:
    good = {"multiple_choice": MC_LINES[0], "schema": SCHEMA_LINES[0], "language_modeling": LM_LINES[0]}[task_type]
    path = _write(tmp_path / "bad.jsonl", [good, "", bad])
    with pytest.raises(icl.IclTaskError) as raised:
        icl.load_icl_task(_config(path, task_type))
    message = str(raised.value)
    assert message.startswith(f"{path}, line 3") and problem in message
    assert (f"field {field!r}" in message) if field else "field" not in message


def test_missing_file_and_builtin_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(icl.IclTaskError, match="no such task file"):
        icl.load_icl_task(_config(tmp_path / "absent.jsonl", "schema"))
    path = _write(tmp_path / "mc.jsonl", MC_LINES)
    with pytest.raises(icl.IclTaskError, match="built-in task"):
        icl.load_icl_task(_config(path, "multiple_choice", name="copa"))


def test_settings_check_icl_tasks_and_num_fewshot() -> None:
    with pytest.raises(ValueError, match="task_type must be one of"):
        IclTask(name="x", path="x.jsonl", task_type="question_answering")
    with pytest.raises(ValueError, match="num_fewshot"):
        IclTask(name="x", path="x.jsonl", task_type="schema", num_fewshot=-1)
    with pytest.raises(ValueError, match="num_fewshot"):
        EvalProfile(num_fewshot="heavy")
    with pytest.raises(ValueError, match="unique"):
        EvalProfile(icl_tasks=(IclTask("x", "a.jsonl", "schema"), IclTask("x", "b.jsonl", "schema")))
    assert set(icl.TASK_TYPES) == {"multiple_choice", "schema", "language_modeling"}


# --- few-shot ---------------------------------------------------------------------------------------------------


def test_fewshot_never_includes_the_scored_item_and_is_seeded() -> None:
    for row in range(6):
        shots = fs.draw_shots(6, row, 10, seed=3)
        assert row not in shots and sorted(shots) == [r for r in range(6) if r != row]  # capped at the others
        assert fs.draw_shots(6, row, 3, seed=3) == shots[:3]  # deterministic for a seed
    assert any(fs.draw_shots(50, 0, 5, seed=s) != fs.draw_shots(50, 0, 5, seed=0) for s in (1, 2, 3))
    assert fs.draw_shots(50, 7, 4, seed=0, usable=lambda r: r % 2 == 0) == [
        r for r in fs.shot_candidates(50, 7, 0) if r % 2 == 0][:4]


def test_file_prompts_use_other_lines_only(tmp_path: Path) -> None:
    lines = [{"query": f"Question: item {i}?", "choices": [f"answer {i}", "other"], "gold": 0} for i in range(8)]
    task = icl.load_icl_task(_config(_write(tmp_path / "mc.jsonl", lines), "multiple_choice", num_fewshot=3))
    examples = icl.prompted_examples(task, range(8), seed=5)
    for index, example in enumerate(examples):
        prefix, scored = example.context.rsplit("\n", 1)
        assert scored == f"Question: item {index}?"
        shown = prefix.split("\n")
        assert len(shown) == 3 and f"Question: item {index}? answer {index}" not in shown
        assert all(s in {item.demonstration for item in task.items} for s in shown)
    assert icl.prompted_examples(task, range(8), seed=5) == examples
    assert icl.prompted_examples(task, [2], seed=5)[0] == examples[2]  # an item's prompt ignores the subset


def test_prompt_format_matches_llm_foundry() -> None:
    shots = [ev.MCExample("Question: a?\nAnswer:", [" x", " y"], 1),
             ev.MCExample("Question: b?\nAnswer:", [" z", " w"], 0)]
    scored = ev.MCExample("Question: c?\nAnswer:", [" p", " q"], 0)
    prompted = fs.with_fewshot(scored, [fs.demonstration(s) for s in shots])
    assert prompted.context == "Question: a?\nAnswer: y\nQuestion: b?\nAnswer: z\nQuestion: c?\nAnswer:"
    assert prompted.choices == scored.choices and fs.with_fewshot(scored, []) == scored
    schema = ev.MCExample("It _ fell.", [" fell.", " fell."], 1, choice_contexts=("It A", "It B"))
    assert fs.demonstration(schema) == "It B fell."
    prompted_schema = fs.with_fewshot(schema, ["It C rose."], "\n\n")
    assert prompted_schema.choice_contexts == ("It C rose.\n\nIt A", "It C rose.\n\nIt B")


def test_builtin_tasks_get_demonstrations_from_other_rows() -> None:
    plain = ev.load_task("copa", limit=4, seed=1)
    shot = ev.load_task("copa", limit=4, seed=1, num_fewshot=3)
    assert [e.row for e in shot] == [e.row for e in plain]
    everything = {e.row: fs.demonstration(e) for e in ev.load_task("copa")}
    for zero, few in zip(plain, shot, strict=True):
        assert few.context.endswith("\n" + zero.context) and few.choices == zero.choices
        shown = few.context[: -len(zero.context) - 1].split("\n")
        rows = fs.draw_shots(len(everything), zero.row, 3, seed=1)
        assert shown == [everything[r] for r in rows] and zero.row not in rows
    assert ev.load_task("copa", limit=4, seed=1, num_fewshot=3) == shot


def test_dclm_shot_table_is_what_the_profile_uses(model, tok) -> None:
    assert set(fs.DCLM_NUM_FEWSHOT) == set(ev.TASKS)
    ten = {"arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "social_iqa"}
    assert {t for t, k in fs.DCLM_NUM_FEWSHOT.items() if k == 10} == ten
    assert {k for t, k in fs.DCLM_NUM_FEWSHOT.items() if t not in ten} == {0}
    assert EvalProfile().num_fewshot == fs.DCLM and PROFILES["dclm-400m"].evaluation.num_fewshot == fs.DCLM
    assert [fs.shots_for(0, t) for t in ev.TASKS] == [0] * len(ev.TASKS)
    result = ev.evaluate_tasks(model, tok, ["copa", "arc_easy"], limit_per_task=2, num_fewshot=fs.DCLM)
    assert result.provenance["num_fewshot"] == {"copa": 0, "arc_easy": 10}
    assert result.provenance["num_fewshot_setting"] == fs.DCLM
    assert result.tasks["arc_easy"].item_rows == [e.row for e in ev.load_task("arc_easy", limit=2)]


# --- scoring ----------------------------------------------------------------------------------------------------


def test_language_modeling_reports_greedy_accuracy_and_token_loss(tmp_path: Path, model, tok) -> None:
    (the,) = tok.encode(" the", add_special_tokens=False).ids
    biased = _biased(model, the, 30.0)  # " the" is the argmax after any prefix
    task = icl.load_icl_task(_config(_write(tmp_path / "lm.jsonl", LM_LINES), "language_modeling"))
    result = icl.evaluate_icl_task(biased, tok, task)
    assert result.item_correct == [1, 0, 1] and result.item_rows == [1, 2, 3]
    assert result.accuracy == pytest.approx(2 / 3) and result.centered == pytest.approx(2 / 3)
    requests = [(item.context, item.continuation) for item in task.items]
    expected = ev.continuation_logprobs(biased, tok, requests)
    assert result.item_nll == pytest.approx([-total for total, _ in expected], rel=1e-6)
    assert result.item_tokens == [n for _, n in expected] == [3, len(tok.encode(" zebra").ids), 1]
    assert result.loss_per_token == pytest.approx(-sum(t for t, _ in expected) / sum(n for _, n in expected))
    # the unbiased model reproduces none of them, and greedy agrees with an explicit argmax
    plain = ev.greedy_continuations(model, tok, requests)
    for (context, continuation), (_, _, hit) in zip(requests, plain, strict=True):
        ids = tok.encode(context, add_special_tokens=False).ids + tok.encode(continuation).ids
        n = len(tok.encode(continuation).ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0]
        assert hit == all(int(logits[t - 1].argmax()) == ids[t] for t in range(len(ids) - n, len(ids)))


def test_profile_icl_tasks_are_evaluated_beside_builtin_tasks(tmp_path: Path, model, tok) -> None:
    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes("tasks/mc.jsonl", _write(tmp_path / "mc.jsonl", MC_LINES).read_bytes())
    lm_path = _write(tmp_path / "lm.jsonl", LM_LINES)
    settings = EvalProfile(tasks=("copa",), limit_per_task=3, num_fewshot=0, icl_tasks=(
        IclTask("facts", "tasks/mc.jsonl", "multiple_choice", num_fewshot=2),  # in the storage root
        IclTask("echo", str(lm_path), "language_modeling")))  # an absolute path
    tasks = load_icl_tasks(storage, settings)
    result = icl.evaluate_all(model, tok, list(settings.tasks), tasks, settings.limit_per_task, settings.seed,
                              settings.num_fewshot)
    assert list(result.tasks) == ["copa", "facts", "echo"]
    assert result.tasks["facts"].n_examples == 3 and len(result.tasks["facts"].item_correct) == 3
    assert result.tasks["facts"].item_rows == [tasks[0].items[i].line for i in icl.scored_indices(4, 3, 0)]
    assert result.tasks["echo"].item_rows == [1, 2, 3]
    assert result.core_centered == pytest.approx(sum(t.centered for t in result.tasks.values()) / 3)
    assert result.provenance["num_fewshot"] == {"copa": 0, "facts": 2, "echo": 0}
    assert result.provenance["icl_tasks"]["facts"]["sha256"] == storage.info("tasks/mc.jsonl").sha256
    assert "loss_per_token" in result.to_dict()["tasks"]["echo"]
    bad = _write(tmp_path / "bad.jsonl", [MC_LINES[0], {"query": "q", "choices": ["a", "b"], "gold": 5}])
    with pytest.raises(PermanentFailure, match=r"bad.jsonl, line 2, field 'gold'"):
        load_icl_tasks(storage, EvalProfile(icl_tasks=(IclTask("x", str(bad), "multiple_choice"),)))
