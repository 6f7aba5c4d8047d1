"""Tokenized corpus: packing round trip, data passes, training order, and clear errors for bad shards."""

from __future__ import annotations

import io
import json
import tempfile
import types

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import torch
import zstandard

from groupmates_assets import settings as settings_module
from groupmates_assets.defs.corpus.assets import tokenized_corpus
from groupmates_assets.defs.evaluation.assets import evaluation
from groupmates_assets.defs.pretrain.assets import pretrain_checkpoints
from groupmates_assets.defs.resources import PlatformResource
from groupmates_assets.defs.shared import optim_config
from groupmates_assets.lib import corpus as corpus_lib
from groupmates_assets.lib import layout, lm
from groupmates_assets.lib import pretraining as pt
from groupmates_assets.lib import tokenization as tk
from groupmates_assets.lib.shards import make_doc_id, text_hash
from groupmates_assets.lib.storage import Storage
from groupmates_assets_tests.conftest import use_profile

pytestmark = pytest.mark.unit

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


def _kept(key: str, texts: list[str]) -> pa.Table:
    return pa.table({"doc_id": [make_doc_id(key, i + 1, t) for i, t in enumerate(texts)],
                     "text": pa.array(texts, pa.large_string()),
                     "fields": [json.dumps({"url": f"https://example.org/{i}", "text": "stale"})
                                for i in range(len(texts))]})


def test_selected_shard_round_trip_in_the_shards_order_and_join_checks():
    kept = _kept("web-a", ["alpha", "b\u00e9ta \U0001f600", "gamma"])
    ids = kept.column("doc_id").to_pylist()
    selection = pa.table({"doc_id": [ids[2], "web-b:00000001:ffff", ids[0], "web-a:00000009:0000"],
                          "shard": ["web-a", "web-b", "web-a", "web-a"], "rank": [0, 1, 2, 3],
                          "score": [0.5, 0.1, float("nan"), 0.2]})
    embedded = {d: text_hash(t) for d, t in zip(ids, kept.column("text").to_pylist(), strict=True)}
    shard = corpus_lib.write_selected_shard(kept, selection, "mates", "web-a", embedded)
    assert (shard.documents, shard.ids_not_found, shard.text_hash_mismatches) == (2, 1, 0)
    # the shard's order, not the selection's (ids[2] was picked first): each record keeps its own selection fields
    assert list(corpus_lib.read_selected_shard(shard.data, "web-a.jsonl.zst")) == [(ids[0], "alpha"), (ids[2], "gamma")]
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(shard.data)).read()
    lines = [json.loads(line) for line in raw.splitlines()]
    assert list(lines[0]) == ["url", "text", "doc_id", "selection"]  # the record, then ours (text overrides)
    assert lines[1]["selection"] == {"method": "mates", "rank": 0, "score": 0.5}
    assert lines[0]["selection"]["score"] is None  # NaN as null: the lines stay JSON
    again = corpus_lib.write_selected_shard(kept, selection, "mates", "web-a", embedded)
    assert again.data == shard.data  # deterministic bytes
    changed = corpus_lib.write_selected_shard(kept, selection, "mates", "web-a", {**embedded, ids[0]: "0" * 16})
    assert changed.text_hash_mismatches == 1
    empty = corpus_lib.write_selected_shard(kept, selection.slice(0, 0), "mates", "web-a", embedded)
    assert empty.documents == 0 and list(corpus_lib.read_selected_shard(empty.data, "e")) == []


def test_training_plan_covers_the_budget_and_skips_the_padded_context():
    packed = types.SimpleNamespace(context_len=5, n_contexts=6, pad_context=5)  # 4 tokens a context
    plan = corpus_lib.plan_training(packed, budget_tokens=45, seeds=2, seed=3, method="random")
    assert plan.usable.tolist() == [0, 1, 2, 3, 4] and plan.passes == 3
    assert plan.orders.shape == (2, 12) and plan.orders.dtype == np.int64 and 5 not in plan.orders
    assert plan.complete_passes == 2 and plan.every_pass_complete()
    assert not np.array_equal(plan.orders[0], plan.orders[1])  # one order per seed
    other = corpus_lib.plan_training(packed, 45, 2, 3, method="mates")
    assert not np.array_equal(plan.orders, other.orders)  # methods never share an order
    broken = corpus_lib.TrainingPlan(plan.usable, plan.passes, np.zeros((1, 10), dtype=np.int64))
    assert not broken.every_pass_complete()


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
               "platform": PlatformResource(storage_root=storage.root)}  # the profile this process loaded


def test_tokenized_corpus_round_trip_and_passes(corpus_setup, monkeypatch):
    result = dg.materialize([tokenized_corpus], partition_key="random", instance=corpus_setup["instance"],
                            resources=_resources(corpus_setup, monkeypatch, "corpus-s1", stages=1, seeds=2))
    metadata = result.asset_materializations_for_node("tokenized_corpus")[0].metadata
    assert result.get_asset_check_evaluations()[0].passed
    storage = corpus_setup["storage"]
    current = storage.read_json("tokenized_corpus/random/current.json")
    contexts = np.asarray(storage.read_numpy(f"{current['path']}/contexts.npy"))
    lineage = storage.read_parquet(f"{current['path']}/lineage.parquet").to_pylist()
    orders = np.asarray(storage.read_numpy(f"{current['path']}/orders.npy"))
    manifest = storage.read_json(f"{current['path']}/manifest.json")
    tokenizer = tk.load_tokenizer()
    eot = tk.eot_token_id(tokenizer)
    all_texts = {f"{key}:{i:08d}:x": t for key in KEYS for i, t in enumerate(corpus_setup["texts"][key])}
    assert metadata["documents"].value == len(all_texts) == 24
    for doc_id, text in all_texts.items():  # decoding the packed pieces gives back every document exactly
        pieces = sorted((p for p in lineage if p["doc_id"] == doc_id), key=lambda p: p["doc_offset"])
        tokens = np.concatenate([contexts[p["context_index"], p["start"]:p["end"]] for p in pieces]).tolist()
        assert tokens == [*tokenizer.encode(text).ids, eot]
    # S = 1: each run reads 10 steps x 2 sequences x 64 tokens = 1,280 tokens: more than the corpus, so passes
    # repeat; one training order per seed.
    usable = manifest["usable_contexts"]
    assert manifest["token_budget"] == 1280 and manifest["passes"] == -(-1280 // (usable * 64)) >= 2
    assert orders.shape == (2, 20) and not np.array_equal(orders[0], orders[1])
    for order in orders:
        assert manifest["pad_context"] not in set(order.tolist())
        for p in range(len(order) // usable):
            assert sorted(order[p * usable:(p + 1) * usable].tolist()) == sorted(set(order.tolist()))


def test_missing_selected_corpus_is_named(corpus_setup):
    corpus_setup["storage"].remove("selected_corpus/_stats/web-b.json")
    with pytest.raises(Exception, match="selected_corpus is missing for shards web-b"):
        dg.materialize([tokenized_corpus], partition_key="random", instance=corpus_setup["instance"],
                       resources={"platform": corpus_setup["platform"]})


def _resources(corpus_setup, monkeypatch, name: str, **pretrain) -> dict:
    """Resources for a registered copy of the ci profile with these pretraining settings."""
    ci = settings_module.PROFILES["ci"]
    use_profile(monkeypatch, settings_module.Profile(
        name=name, description="ci with frequent checkpoints", lm=ci.lm, tokenize=ci.tokenize,
        pretrain=settings_module.PretrainProfile(**pretrain), evaluation=ci.evaluation))
    return {"platform": PlatformResource(storage_root=corpus_setup["storage"].root, profile=name)}


def _probe_checkpoint(storage: Storage, step: int) -> bytes:
    """A stage-1 checkpoint of the ci LM at ``step`` (the optimizer has moments), stored where S = 2 reads it."""
    ci = settings_module.PROFILES["ci"].lm
    shape = lm.get_shape(ci.shape)
    cfg = optim_config(ci)
    model = lm.build_model(shape, seed=ci.seed)
    optimizer = lm.make_optimizer(model, cfg)
    batches = (torch.randint(0, 1000, (ci.batch_size, shape.seq_len + 1)) for _ in range(step))
    lm.pretrain(model, optimizer, batches, cfg, steps=step)
    with tempfile.TemporaryDirectory() as tmp:
        lm.save_checkpoint(tmp, model, optimizer, shape, cfg, step, {"tokens_seen": step * ci.batch_size * 64})
        storage.put_dir(tmp, layout.PROBE_CHECKPOINT_DIR, pt.CHECKPOINT_FILES)
    return storage.read_bytes(f"{layout.PROBE_CHECKPOINT_DIR}/model.safetensors")


def test_pretraining_resumes_to_the_same_weights(corpus_setup, monkeypatch):
    """S = 1: a run killed after a checkpoint resumes there and ends with byte-identical weights; two seeds."""
    resources = _resources(corpus_setup, monkeypatch, "pretrain-s1", stages=1, seeds=2, checkpoint_every=4)
    assets = [tokenized_corpus, pretrain_checkpoints, evaluation]
    run = {"instance": corpus_setup["instance"], "resources": resources, "partition_key": "random"}
    dg.materialize(assets, selection=["tokenized_corpus"], **run)
    first = dg.materialize(assets, selection=["pretrain_checkpoints"], **run)
    metadata = first.asset_materializations_for_node("pretrain_checkpoints")[0].metadata
    assert metadata["stage_steps"].value == 10 and metadata["start_step"].value == 0
    assert metadata["resumed_from_steps"].value == [0, 0]
    assert metadata["checkpoints"].value == {"seed-0": [4, 8, 10], "seed-1": [4, 8, 10]}
    storage = corpus_setup["storage"]
    runs = storage.read_json("pretrain/random/current.json")["runs"]
    run_dir = runs[0]["path"]
    final = storage.read_bytes(f"{run_dir}/step-000010/model.safetensors")
    assert final != storage.read_bytes(f"{runs[1]['path']}/step-000010/model.safetensors")  # seeds differ
    for step in ("step-000008", "step-000010"):  # as if killed right after the step-4 checkpoint
        storage.remove(f"{run_dir}/{step}", recursive=True)
    again = dg.materialize(assets, selection=["pretrain_checkpoints"], **run)
    metadata = again.asset_materializations_for_node("pretrain_checkpoints")[0].metadata
    assert metadata["resumed_from_steps"].value == [4, 10]  # seed 1 was complete: nothing retrained
    assert storage.read_bytes(f"{run_dir}/step-000010/model.safetensors") == final
    assert [r["step"] for r in storage.read_json(f"{run_dir}/curve.json")] == list(range(1, 11))

    # Every checkpoint of both seeds evaluated: every configured task scored, centered accuracy, bits per byte
    # on the current pool's held-out slice, per source and pooled.
    sampled = _pool_heldout_slice(storage, corpus_setup["instance"])
    evaluated = dg.materialize(assets, selection=["evaluation"], **run)
    metadata = evaluated.asset_materializations_for_node("evaluation")[0].metadata
    report = storage.read_json("evaluation/random.json")
    assert metadata["checkpoints_evaluated_now"].value == 6 and metadata["seeds"].value == 2
    assert [[p["step"] for p in r["points"]] for r in report["runs"]] == [[4, 8, 10], [4, 8, 10]]
    final = report["final"]
    assert set(final["tasks"]) == {"arc_easy", "arc_challenge", "copa", "openbookqa"}
    values = final["core_centered"]["values"]
    assert final["core_centered"]["mean"] == pytest.approx(np.mean(values))
    assert final["core_centered"]["std"] == pytest.approx(np.std(values, ddof=1))  # sample std over seeds
    assert metadata["core_centered_t_low"].value <= metadata["core_centered"].value <= metadata[
        "core_centered_t_high"].value  # the Student t interval over the two seeds
    assert "core_centered_uniform" in metadata and "random_minus_random_core_centered" not in metadata
    assert report["heldout"]["documents"] == 10 and 0 < metadata["bits_per_byte"].value < 20
    assert report["heldout"]["path"] is None and report["heldout"]["available"] == 14  # the pool's slice
    assert report["heldout"]["by_source"] == {"wiki": 6, "code": 4}  # 8:6 in proportion, at least 3 each
    point_dir = f"evaluation/random/{report['evaluation_fingerprint']}/{runs[0]['path'].rsplit('/', 2)[-2]}"
    docs = storage.read_json(f"{point_dir}/seed-0/step-000010.json")["heldout_documents"]
    assert set(docs["doc_id"]) <= sampled and len(docs["doc_id"]) == len(docs["nll"]) == 10
    assert set(final["bits_per_byte_by_source"]) == {"wiki", "code", "all"}
    assert final["bits_per_byte_by_source"]["all"]["values"] == pytest.approx(final["bits_per_byte"]["values"])
    assert "| wiki | 6 |" in metadata["bits_per_byte_by_source"].value
    assert final["step"] == 10
    again = dg.materialize(assets, selection=["evaluation"], **run)  # evaluated checkpoints are not redone
    assert again.asset_materializations_for_node("evaluation")[0].metadata["checkpoints_evaluated_now"].value == 0
    storage.remove("filtered_pool/web-b/stats.json")  # web-b's filtering is incomplete: another held-out set
    changed = dg.materialize(assets, selection=["evaluation"], **run)
    assert changed.asset_materializations_for_node("evaluation")[0].metadata["checkpoints_evaluated_now"].value == 6
    assert storage.read_json("evaluation/random.json")["heldout"]["available"] == 7


def _pool_heldout_slice(storage: Storage, instance: dg.DagsterInstance) -> set[str]:
    """The pool's held-out slice as the filter step leaves it (heldout.parquet and the stats.json completion marker)
    in both registered shards, 8 wiki and 6 code documents; returns their doc ids."""
    instance.add_dynamic_partitions("pool_shards", KEYS)
    ids = set()
    for k, key in enumerate(KEYS):
        storage.write_bytes(f"{layout.EMBEDDED_SHARDS_DIR}/{key}.jsonl.zst", _shard([{"text": "x"}]))
        texts = [(f"Held-out article {k}-{i}: rivers carry water to the sea.", "wiki") for i in range(4)] + [
            (f"def held_out_{k}_{i}(x):\n    return x + {i}", "code") for i in range(3)]
        doc_ids = [make_doc_id(key, i + 1, t) for i, (t, _) in enumerate(texts)]
        storage.write_parquet(f"filtered_pool/{key}/heldout.parquet", pa.table(
            {"doc_id": doc_ids, "line": list(range(1, 8)), "text": pa.array([t for t, _ in texts], pa.large_string()),
             "source": [s for _, s in texts]}))
        storage.write_json(f"filtered_pool/{key}/stats.json", {"heldout": len(texts)})
        ids |= set(doc_ids)
    return ids


def test_stage_two_continues_the_probe_run(corpus_setup, monkeypatch):
    """S = 2: each run starts from the probe checkpoint (weights, moments, schedule) at its step and trains the
    remaining steps on the selected data."""
    resources = _resources(corpus_setup, monkeypatch, "pretrain-s2", stages=2, seeds=1, checkpoint_every=3)
    storage = corpus_setup["storage"]
    _probe_checkpoint(storage, step=4)
    assets = [tokenized_corpus, pretrain_checkpoints]
    run = {"instance": corpus_setup["instance"], "resources": resources, "partition_key": "random"}
    dg.materialize(assets, selection=["tokenized_corpus"], **run)
    result = dg.materialize(assets, selection=["pretrain_checkpoints"], **run)
    metadata = result.asset_materializations_for_node("pretrain_checkpoints")[0].metadata
    assert (metadata["start_step"].value, metadata["final_step"].value) == (4, 10)
    assert metadata["checkpoints"].value == {"seed-0": [6, 9, 10]}
    run_dir = storage.read_json("pretrain/random/current.json")["runs"][0]["path"]
    curve = storage.read_json(f"{run_dir}/curve.json")
    assert [r["step"] for r in curve] == list(range(5, 11)) and curve[-1]["tokens_seen"] == 10 * 2 * 64
    ci = settings_module.PROFILES["ci"].lm
    cfg = optim_config(ci)
    assert [r["lr"] for r in curve] == pytest.approx([lm.lr_at(s, cfg) for s in range(4, 10)])
    # The first stage-2 step equals one step of the probe checkpoint on the corpus' first batch.
    with storage.local_dir(layout.PROBE_CHECKPOINT_DIR, pt.CHECKPOINT_FILES) as local:
        model, optimizer, _ = lm.load_checkpoint(local, "cpu")
    current = storage.read_json("tokenized_corpus/random/current.json")
    tokens = storage.read_numpy(f"{current['path']}/contexts.npy")
    order = storage.read_numpy(f"{current['path']}/orders.npy")[0]
    batch = torch.from_numpy(np.asarray(tokens[order[:2]]).astype(np.int64))
    step = lm.train_step(model, optimizer, batch, cfg, lr=lm.lr_at(4, cfg))
    assert step["loss"] == pytest.approx(curve[0]["loss"], rel=1e-6)


def test_torchrun_through_pipes_matches_one_process(corpus_setup, monkeypatch):
    """pretrain.gpus_per_run = 2 on the CPU: torchrun (gloo) launched through Dagster Pipes, rank 0 reporting
    back, trains the same run as one process on the whole batch."""
    storage = corpus_setup["storage"]
    one = _resources(corpus_setup, monkeypatch, "pretrain-one", stages=1, seeds=1, checkpoint_every=5)
    run = {"instance": corpus_setup["instance"], "partition_key": "random"}
    assets = [tokenized_corpus, pretrain_checkpoints]
    dg.materialize(assets, selection=["tokenized_corpus"], resources=one, **run)
    dg.materialize(assets, selection=["pretrain_checkpoints"], resources=one, **run)
    single = storage.read_json(f"{storage.read_json('pretrain/random/current.json')['runs'][0]['path']}/curve.json")
    storage.remove("pretrain", recursive=True)
    # the code location reloaded with the two-process profile (one profile per loaded code location)
    two = _resources(corpus_setup, monkeypatch, "pretrain-two", stages=1, seeds=1, checkpoint_every=5, gpus_per_run=2)
    result = dg.materialize(assets, selection=["pretrain_checkpoints"], resources=two, **run)
    metadata = result.asset_materializations_for_node("pretrain_checkpoints")[0].metadata
    assert metadata["launcher"].value == "torchrun" and metadata["checkpoints"].value == {"seed-0": [5, 10]}
    distributed = storage.read_json(f"{storage.read_json('pretrain/random/current.json')['runs'][0]['path']}/"
                                    "curve.json")
    assert [r["step"] for r in distributed] == [r["step"] for r in single] == list(range(1, 11))
    assert [r["loss"] for r in distributed] == pytest.approx([r["loss"] for r in single], rel=1e-4)
