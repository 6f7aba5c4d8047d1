"""The user's own evaluation tasks: JSON-lines files in LLM Foundry's ICL format, the format DCLM's evaluation reads.

One JSON object per line (blank lines are skipped; line numbers count every line, from 1):
  * "multiple_choice": {"query": str, "choices": [str, ...], "gold": int} -- each choice is scored after the query;
  * "schema": {"context_options": [str, ...], "continuation": str, "gold": int} -- the shared continuation is scored
    after each context option (partial evaluation, as Winogrande);
  * "language_modeling": {"context": str, "continuation": str} -- accuracy is 1 when greedy decoding reproduces the
    continuation (every continuation token is the argmax given the tokens before it), and the per-token loss of
    the continuation is reported beside it.
Prompts follow LLM Foundry: string fields are stripped, the scored context is `context + continuation_delimiter`
right-stripped, the continuation gets a leading space (GPT-NeoX-style BPE needs it), and a demonstration is
`context + continuation_delimiter + gold continuation`, joined to the next by `example_delimiter` (`lib.fewshot`).
Demonstrations come from other lines of the same file, never the scored line.
Multiple-choice and schema tasks are scored as the built-in ones (per-token log-likelihood, rank classification);
language-modeling tasks join `core_centered` with random baseline 0, as DCLM core counts LAMBADA.

Plain Python/torch: no Dagster here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import fsspec
import numpy as np
import torch
import zstandard
from tokenizers import Tokenizer

from groupmates_assets.lib import evaluation as ev
from groupmates_assets.lib import fewshot as fs
from groupmates_assets.lib.storage import Storage, fs_options

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


class IclTaskError(ValueError):
    """A task file that cannot be read as its task type; the message names the file, line and field."""


class IclTaskConfig(Protocol):
    """What a task needs from the profile (settings.IclTask)."""

    name: str
    path: str
    task_type: str
    num_fewshot: int
    random_baseline: float | None
    continuation_delimiter: str
    example_delimiter: str


@dataclasses.dataclass(frozen=True)
class IclItem:
    """One scored line: its choices (multiple_choice, schema) or its continuation (language_modeling), and the
    text it shows as a demonstration in other lines' prompts."""

    line: int  # 1-based line number in the file
    demonstration: str
    example: ev.MCExample | None = None
    context: str = ""  # language_modeling
    continuation: str = ""  # language_modeling


@dataclasses.dataclass(frozen=True)
class IclTaskData:
    """A parsed task file and how to score it."""

    name: str
    path: str
    task_type: str
    items: list[IclItem]
    sha256: str
    num_fewshot: int = 0
    random_baseline: float | None = None
    example_delimiter: str = fs.EXAMPLE_DELIMITER

    def baseline(self) -> float:
        """The configured random baseline, else 0 for language modeling and mean 1/num_choices otherwise."""
        if self.random_baseline is not None:
            return self.random_baseline
        if self.task_type == "language_modeling":
            return 0.0
        return float(np.mean([1 / len(item.example.choices) for item in self.items if item.example]))


@dataclasses.dataclass(frozen=True)
class LMTaskResult(ev.TaskResult):
    """A language-modeling task: greedy accuracy (in `accuracy`) and the continuations' loss."""

    loss_per_token: float = float("nan")  # total continuation NLL / continuation tokens, nats
    item_nll: list[float] = dataclasses.field(default_factory=list)  # per item, nats, summed over its tokens
    item_tokens: list[int] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------------------ parsing


def _fail(source: str, line: int, field: str | None, problem: str) -> IclTaskError:
    where = f"{source}, line {line}" + (f", field {field!r}" if field else "")
    return IclTaskError(f"{where}: {problem}")


def _text(record: dict[str, Any], key: str, source: str, line: int, nonempty: bool = False) -> str:
    if key not in record:
        raise _fail(source, line, key, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise _fail(source, line, key, f"must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise _fail(source, line, key, "must not be empty")
    return value.strip()  # LLM Foundry strips every string field (strip_dataset)


def _options(record: dict[str, Any], key: str, source: str, line: int) -> list[str]:
    if key not in record:
        raise _fail(source, line, key, "missing")
    value = record[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, line, key, "must be a list of strings")
    if len(value) < 2:
        raise _fail(source, line, key, f"needs at least 2 entries, got {len(value)}")
    return value


def _gold(record: dict[str, Any], n_options: int, source: str, line: int) -> int:
    if "gold" not in record:
        raise _fail(source, line, "gold", "missing")
    gold = record["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise _fail(source, line, "gold", f"must be an integer, got {type(gold).__name__}")
    if not 0 <= gold < n_options:
        raise _fail(source, line, "gold", f"{gold} is out of range for {n_options} options")
    return gold


def _spaced(continuation: str) -> str:
    return continuation if continuation.startswith(" ") else f" {continuation}"


def _multiple_choice(record: dict[str, Any], source: str, line: int, delimiter: str) -> IclItem:
    query = _text(record, "query", source, line)
    choices = _options(record, "choices", source, line)
    gold = _gold(record, len(choices), source, line)
    example = ev.MCExample((query + delimiter).rstrip(), [_spaced(c) for c in choices], gold, row=line)
    return IclItem(line, query + delimiter + choices[gold], example)


def _schema(record: dict[str, Any], source: str, line: int, delimiter: str) -> IclItem:
    options = _options(record, "context_options", source, line)
    continuation = _text(record, "continuation", source, line, nonempty=True)
    gold = _gold(record, len(options), source, line)
    contexts = tuple(option + delimiter.rstrip() for option in options)
    example = ev.MCExample(options[gold], [_spaced(continuation)] * len(options), gold, choice_contexts=contexts,
                           row=line)
    return IclItem(line, options[gold] + delimiter + continuation, example)


def _language_modeling(record: dict[str, Any], source: str, line: int, delimiter: str) -> IclItem:
    context = _text(record, "context", source, line)
    continuation = _text(record, "continuation", source, line, nonempty=True)
    return IclItem(line, context + delimiter + continuation, context=(context + delimiter).rstrip(),
                   continuation=_spaced(continuation))


_PARSERS: dict[str, Callable[[dict[str, Any], str, int, str], IclItem]] = {
    "multiple_choice": _multiple_choice, "schema": _schema, "language_modeling": _language_modeling}


def parse_icl_lines(data: bytes, source: str, task_type: str,
                    continuation_delimiter: str = fs.CONTINUATION_DELIMITER) -> list[IclItem]:
    """The items of a task file's bytes, in line order; `source` names the file in errors."""
    if task_type not in _PARSERS:
        raise IclTaskError(f"{source}: task_type must be one of {TASK_TYPES}, got {task_type!r}")
    items = []
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _fail(source, number, None, f"invalid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise _fail(source, number, None, f"must be a JSON object, got {type(record).__name__}")
        items.append(_PARSERS[task_type](record, source, number, continuation_delimiter))
    if len(items) < 1:
        raise IclTaskError(f"{source}: no task lines")
    return items


def read_task_bytes(path: str, storage: Storage | None) -> tuple[bytes, str]:
    """A task file's bytes (zstd-decompressed for .zst) and a name for it in errors: a URL (s3://...) or absolute
    path through fsspec, else a path in the storage root (`positives_path` and `heldout_path` read alike)."""
    try:
        if "://" in path or os.path.isabs(path) or storage is None:
            filesystem, resolved = fsspec.core.url_to_fs(path, **fs_options(path))
            data, source = filesystem.cat_file(resolved), path
        else:
            data, source = storage.read_bytes(path), storage.url(path)
    except FileNotFoundError as exc:
        raise IclTaskError(f"{path}: no such task file") from exc
    if path.endswith((".zst", ".zstd")):
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return data, source


def load_icl_task(config: IclTaskConfig, storage: Storage | None = None) -> IclTaskData:
    """Read and check one configured task file (every line is checked, not only those that will be scored)."""
    if config.name in ev.TASKS:
        raise IclTaskError(f"icl task {config.name!r} has the name of a built-in task; rename it")
    data, source = read_task_bytes(config.path, storage)
    items = parse_icl_lines(data, source, config.task_type, config.continuation_delimiter)
    return IclTaskData(config.name, config.path, config.task_type, items, hashlib.sha256(data).hexdigest(),
                       config.num_fewshot, config.random_baseline, config.example_delimiter)


# ------------------------------------------------------------------------------------------------ scoring


def scored_indices(n_items: int, limit: int | None, seed: int) -> list[int]:
    """Every item, or a seeded subset of `limit` of them in file order (as the built-in tasks' `limit_per_task`)."""
    if limit is None or limit >= n_items:
        return list(range(n_items))
    return sorted(np.random.default_rng(seed).permutation(n_items)[:limit].tolist())


def demonstrations(task: IclTaskData, index: int, seed: int) -> list[str]:
    """The demonstrations in front of item `index`: `num_fewshot` other items of the file, seeded by (seed, index)."""
    return [task.items[i].demonstration for i in fs.draw_shots(len(task.items), index, task.num_fewshot, seed)]


def prompted_examples(task: IclTaskData, indices: Sequence[int], seed: int) -> list[ev.MCExample]:
    """The multiple-choice/schema items at `indices`, their contexts behind their demonstrations."""
    return [fs.with_fewshot(task.items[i].example, demonstrations(task, i, seed), task.example_delimiter)
            for i in indices if task.items[i].example is not None]


def evaluate_icl_task(model: torch.nn.Module, tokenizer: Tokenizer, task: IclTaskData, limit: int | None = None,
                      seed: int = 0, max_tokens_per_batch: int = 4096, device: torch.device | str | None = None,
                      max_length: int | None = None) -> ev.TaskResult:
    """One user task; `item_rows` are the scored line numbers."""
    indices = scored_indices(len(task.items), limit, seed)
    if task.task_type != "language_modeling":
        return ev.evaluate_examples(model, tokenizer, task.name, prompted_examples(task, indices, seed),
                                    task.baseline(), max_tokens_per_batch, device, max_length)
    requests = [(fs.prompt(demonstrations(task, i, seed), task.items[i].context, task.example_delimiter),
                 task.items[i].continuation) for i in indices]
    scored = ev.greedy_continuations(model, tokenizer, requests, max_length, max_tokens_per_batch, device)
    hits = [int(hit) for _, _, hit in scored]
    nll, tokens = [-total for total, _, _ in scored], [n for _, n, _ in scored]
    accuracy = float(np.mean(hits))
    return LMTaskResult(task=task.name, n_examples=len(indices), accuracy=accuracy, acc_raw=accuracy,
                        acc_char=accuracy, random_baseline=task.baseline(),
                        centered=ev.centered_accuracy(accuracy, task.baseline()),
                        random_baseline_uniform=task.baseline(),
                        centered_uniform=ev.centered_accuracy(accuracy, task.baseline()), item_correct=hits,
                        item_rows=[task.items[i].line for i in indices],
                        loss_per_token=sum(nll) / sum(tokens) if tokens else math.nan, item_nll=nll,
                        item_tokens=tokens)


def evaluate_all(model: torch.nn.Module, tokenizer: Tokenizer, task_names: Sequence[str] | None,
                 icl_tasks: Sequence[IclTaskData] = (), limit_per_task: int | None = None, seed: int = 0,
                 num_fewshot: int | str = 0, max_tokens_per_batch: int = 4096,
                 device: torch.device | str | None = None, max_length: int | None = None,
                 cache_dir: str | None = None) -> ev.EvalResult:
    """The built-in tasks (`evaluation.evaluate_tasks`) and the user's task files, side by side; `core_centered`
    is the mean centered accuracy over all of them, and the provenance records the shots and file of each."""
    base = ev.evaluate_tasks(model, tokenizer, task_names, limit_per_task, seed, max_tokens_per_batch, device,
                             max_length, cache_dir, num_fewshot)
    if not icl_tasks:
        return base
    tasks = dict(base.tasks)
    for task in icl_tasks:
        if task.name in tasks:
            raise IclTaskError(f"icl task {task.name!r} is evaluated twice; task names must be unique")
        tasks[task.name] = evaluate_icl_task(model, tokenizer, task, limit_per_task, seed, max_tokens_per_batch,
                                             device, max_length)
    provenance = {**base.provenance,
                  "num_fewshot": {**base.provenance["num_fewshot"], **{t.name: t.num_fewshot for t in icl_tasks}},
                  "icl_tasks": {t.name: {"path": t.path, "sha256": t.sha256, "task_type": t.task_type,
                                         "lines": len(t.items), "example_delimiter": t.example_delimiter,
                                         "random_baseline": t.baseline(), "rows": tasks[t.name].item_rows}
                                for t in icl_tasks}}
    core = float(np.mean([result.centered for result in tasks.values()]))
    return ev.EvalResult(tasks=tasks, core_centered=core, provenance=provenance)
