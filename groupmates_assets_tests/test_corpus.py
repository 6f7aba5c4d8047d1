"""Tokenized corpus: packing round trip, data passes, training order, and clear errors for bad shards."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pytest
import zstandard

from groupmates_assets import settings as settings_module
from groupmates_assets.defs.corpus.assets import tokenized_corpus
from groupmates_assets.defs.evaluation.assets import evaluation
from groupmates_assets.defs.pretrain.assets import pretrain_checkpoints
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.lib import corpus as corpus_lib
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.storage import Storage

KEYS = ["web-a", "web-b"]


def _shard(records: list[dict]) -> bytes:
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    return zstandard.ZstdCompressor().compress(raw)


def test_passes_and_training_order():
    assert corpus_lib.passes_needed(1000, 500) == 1
    assert corpus_lib.passes_needed(1000, 2500) == 3
    with pytest.raises(ValueError, match="no tokens"):
        corpus_lib.passes_needed(0, 10)
    order = corpus_lib.training_order(50, passes=3, seed=7)
    assert len(order) == 150
    for p in range(3):
        assert sorted(order[p * 50:(p + 1) * 50]) == list(range(50))
    assert not np.array_equal(order[:50], order[50:100])  # every pass is its own shuffle
    assert np.array_equal(corpus_lib.training_order(50, 3, seed=7, budget_contexts=120), order[:120])


def test_bad_shards_name_the_file_and_line():
    with pytest.raises(corpus_lib.CorpusShardError, match=r"web-a\.jsonl\.zst: not a readable zstd stream"):
        list(corpus_lib.read_selected_shard(b"not zstd", "web-a.jsonl.zst"))
    data = _shard([{"doc_id": "a", "text": "fine"}, {"text": "no id"}])
    with pytest.raises(corpus_lib.CorpusShardError, match=r"web-b\.jsonl\.zst, line 2"):
        list(corpus_lib.read_selected_shard(data, "web-b.jsonl.zst"))


@pytest.fixture()
def corpus_setup(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    texts = {key: [f"Document {i} of {key}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 4)
                   for i in range(12)] for key in KEYS}
    shards = []
    for key in KEYS:
        records = [{"doc_id": f"{key}:{i:08d}:x", "text": t, "url": "u", "selection": {"method": "random"}}
                   for i, t in enumerate(texts[key])]
        info = storage.write_bytes(f"selected_corpus/random/{key}.jsonl.zst", _shard(records))
        storage.write_json(f"selected_corpus/_stats/{key}.json", {"sha256": {"random": info.sha256}})
        shards.append({"key": key})
    storage.write_json("filtered_pool/_manifest.json", {"shards": shards})
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        yield {"storage": storage, "instance": instance, "texts": texts,
               "platform": PlatformResource(storage_root=storage.root, profile="ci")}


def test_tokenized_corpus_round_trip_and_passes(corpus_setup):
    result = dg.materialize([tokenized_corpus], partition_key="random", instance=corpus_setup["instance"],
                            resources={"platform": corpus_setup["platform"]})
    metadata = result.asset_materializations_for_node("tokenized_corpus")[0].metadata
    assert result.get_asset_check_evaluations()[0].passed
    storage = corpus_setup["storage"]
    current = storage.read_json("tokenized_corpus/random/current.json")
    contexts = np.asarray(storage.read_numpy(f"{current['path']}/contexts.npy"))
    lineage = storage.read_parquet(f"{current['path']}/lineage.parquet").to_pylist()
    order = np.asarray(storage.read_numpy(f"{current['path']}/order.npy"))
    manifest = storage.read_json(f"{current['path']}/manifest.json")
    tokenizer = tk.load_tokenizer()
    eot = tk.eot_token_id(tokenizer)
    all_texts = {f"{key}:{i:08d}:x": t for key in KEYS for i, t in enumerate(corpus_setup["texts"][key])}
    assert metadata["documents"].value == len(all_texts) == 24
    for doc_id, text in all_texts.items():  # decoding the packed pieces gives back every document exactly
        pieces = sorted((p for p in lineage if p["doc_id"] == doc_id), key=lambda p: p["doc_offset"])
        tokens = np.concatenate([contexts[p["context_index"], p["start"]:p["end"]] for p in pieces]).tolist()
        assert tokens == [*tokenizer.encode(text).ids, eot]
    # The ci LM reads 10 steps x 2 sequences x 64 tokens = 1,280 tokens: more than the corpus, so passes repeat.
    usable = manifest["usable_contexts"]
    assert manifest["token_budget"] == 1280 and manifest["passes"] == -(-1280 // (usable * 64)) >= 2
    assert len(order) == 20 and manifest["pad_context"] not in set(order.tolist())
    for p in range(len(order) // usable):
        assert sorted(order[p * usable:(p + 1) * usable].tolist()) == sorted(set(order.tolist()))


def test_missing_selected_corpus_is_named(corpus_setup):
    corpus_setup["storage"].remove("selected_corpus/_stats/web-b.json")
    with pytest.raises(Exception, match="selected_corpus is missing for shards web-b"):
        dg.materialize([tokenized_corpus], partition_key="random", instance=corpus_setup["instance"],
                       resources={"platform": corpus_setup["platform"]})


def test_pretraining_resumes_to_the_same_weights(corpus_setup, monkeypatch):
    """A run killed after a checkpoint resumes there and ends with byte-identical weights."""
    ci = settings_module.PROFILES["ci"]
    monkeypatch.setitem(settings_module.PROFILES, "pretrain-test", settings_module.Profile(
        name="pretrain-test", description="ci with frequent checkpoints", lm=ci.lm, tokenize=ci.tokenize,
        corpus=settings_module.CorpusProfile(checkpoint_every=4), evaluation=ci.evaluation))
    resources = {"platform": PlatformResource(storage_root=corpus_setup["storage"].root, profile="pretrain-test")}
    assets = [tokenized_corpus, pretrain_checkpoints, evaluation]
    run = {"instance": corpus_setup["instance"], "resources": resources, "partition_key": "random"}
    dg.materialize(assets, selection=["tokenized_corpus"], **run)
    first = dg.materialize(assets, selection=["pretrain_checkpoints"], **run)
    metadata = first.asset_materializations_for_node("pretrain_checkpoints")[0].metadata
    assert metadata["steps"].value == 10 and metadata["resumed_from_step"].value == 0
    assert metadata["checkpoints"].value == ["step-000004", "step-000008", "step-000010"]
    storage = corpus_setup["storage"]
    run_dir = storage.read_json("pretrain/random/current.json")["path"]
    final = storage.read_bytes(f"{run_dir}/step-000010/model.safetensors")
    for step in ("step-000008", "step-000010"):  # as if killed right after the step-4 checkpoint
        storage.remove(f"{run_dir}/{step}", recursive=True)
    again = dg.materialize(assets, selection=["pretrain_checkpoints"], **run)
    metadata = again.asset_materializations_for_node("pretrain_checkpoints")[0].metadata
    assert metadata["resumed_from_step"].value == 4
    assert storage.read_bytes(f"{run_dir}/step-000010/model.safetensors") == final
    assert [r["step"] for r in storage.read_json(f"{run_dir}/curve.json")] == list(range(1, 11))

    # The trained LM evaluated: every configured task scored, centered accuracy and held-out bits per byte.
    heldout = [{"text": f"Held-out article {i}: rivers carry water to the sea."} for i in range(12)]
    storage.write_bytes("embedded_pool/positives/wikipedia-summaries-hq.jsonl.zst", _shard(heldout))
    evaluated = dg.materialize(assets, selection=["evaluation"], **run)
    metadata = evaluated.asset_materializations_for_node("evaluation")[0].metadata
    report = storage.read_json("evaluation/random.json")
    assert set(report["tasks"]) == {"arc_easy", "arc_challenge", "copa", "openbookqa"}
    assert all(t["n_examples"] == 4 for t in report["tasks"].values())
    centered = [t["centered"] for t in report["tasks"].values()]
    assert report["core_centered"] == pytest.approx(sum(centered) / len(centered))
    assert report["heldout"]["documents"] == 10 and 0 < metadata["bits_per_byte"].value < 20
    assert report["step"] == 10
