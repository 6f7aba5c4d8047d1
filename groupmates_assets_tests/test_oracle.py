"""Oracle trajectories: invariants T8-T11 of the method spec, plans, and block-level checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from groupmates_assets.lib import lm
from groupmates_assets.lib import oracle as oracle_lib

pytestmark = pytest.mark.unit

VOCAB = 50304


@pytest.fixture(scope="module")
def checkpoint():
    """A tiny LM trained a few steps (so Adam moments are non-zero), a pool of contexts, a reference set."""
    torch.manual_seed(0)
    shape = lm.get_shape("tiny")
    cfg = lm.OptimConfig(lr=3e-3, warmup_steps=2, total_steps=20, final_lr=3e-4)
    model = lm.build_model(shape, seed=1)
    optimizer = lm.make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    vocab = 512  # a small slice of the vocabulary, so a few steps visibly change the reference loss
    pool = rng.integers(0, vocab, size=(32, shape.seq_len + 1)).astype(np.uint32)
    lm.pretrain(model, optimizer, (torch.from_numpy(pool[i:i + 4].astype(np.int64)) for i in range(0, 24, 4)), cfg,
                steps=6)
    examples = []
    for _ in range(16):
        ids = rng.integers(0, vocab, size=20).tolist()
        examples.append((ids, [-100] * 14 + ids[14:]))
    return {"model": model, "optimizer": optimizer, "pool": pool, "cfg": cfg,
            "reference": lm.ReferenceBatch(examples), "snapshot": lm.snapshot(model, optimizer)}


@pytest.fixture(scope="module")
def saved_checkpoint(checkpoint, tmp_path_factory) -> str:
    """The fixture's checkpoint as the oracle assets read it: on disk, loaded afresh by each reader."""
    lm.restore(checkpoint["model"], checkpoint["optimizer"], checkpoint["snapshot"])  # undo earlier trajectories
    directory = tmp_path_factory.mktemp("probe") / "ckpt"
    lm.save_checkpoint(directory, checkpoint["model"], checkpoint["optimizer"], lm.get_shape("tiny"),
                       checkpoint["cfg"], step=6)
    return str(directory)


def _collector(c, fresh_optimizer: bool = False) -> oracle_lib.OracleCollector:
    optimizer = lm.make_optimizer(c["model"], c["cfg"]) if fresh_optimizer else c["optimizer"]
    if fresh_optimizer:
        lm.set_lr(optimizer, lm.current_lr(c["optimizer"]))
    return oracle_lib.OracleCollector(c["model"], optimizer, c["reference"], c["pool"], c["cfg"])


def test_telescoping_sum_equals_directly_recomputed_loss_change(checkpoint):  # T8
    collector = _collector(checkpoint)
    result = collector.run(0, [3, 7, 11, 19])
    assert sum(result.marginal) == pytest.approx(result.cumulative[-1], abs=1e-6)
    lm.restore(checkpoint["model"], checkpoint["optimizer"], collector.checkpoint)
    for row in [3, 7, 11, 19]:
        lm.train_step(checkpoint["model"], checkpoint["optimizer"],
                      torch.from_numpy(checkpoint["pool"][row].astype(np.int64))[None], checkpoint["cfg"])
    direct = lm.reference_loss(checkpoint["model"], checkpoint["reference"])
    assert direct - collector.base_loss == pytest.approx(sum(result.marginal), abs=1e-5)
    lm.restore(checkpoint["model"], checkpoint["optimizer"], collector.checkpoint)


def test_rerun_gives_identical_labels_and_first_label_is_the_single_point_probe(checkpoint):  # T9
    collector = _collector(checkpoint)
    first = collector.run(0, [5, 9, 2])
    again = collector.run(0, [5, 9, 2])
    assert first.cumulative == again.cumulative
    single = collector.run(1, [5])
    assert single.cumulative[0] == first.cumulative[0]


def test_state_carries_over_within_a_trajectory(checkpoint):  # T10
    collector = _collector(checkpoint)
    pair = collector.run(0, [4, 8])
    alone = collector.run(1, [8])
    assert pair.marginal[1] != pytest.approx(alone.marginal[0], abs=1e-7)


def test_checkpoint_optimizer_state_is_used_not_a_fresh_one(checkpoint, saved_checkpoint):  # T11
    restored_model, restored_optimizer, state = lm.load_checkpoint(saved_checkpoint, "cpu")
    fresh_model, _, _ = lm.load_checkpoint(saved_checkpoint, "cpu")
    fresh_optimizer = lm.make_optimizer(fresh_model, state["optim_config"])
    lm.set_lr(fresh_optimizer, state["lr"])  # the same learning rate: only the moments differ
    assert all(torch.equal(a, b) for a, b in zip(restored_model.state_dict().values(),
                                                  fresh_model.state_dict().values(), strict=True))
    assert restored_optimizer.state and not fresh_optimizer.state
    args = (checkpoint["reference"], checkpoint["pool"], state["optim_config"])
    restored_collector = oracle_lib.OracleCollector(restored_model, restored_optimizer, *args)
    fresh_collector = oracle_lib.OracleCollector(fresh_model, fresh_optimizer, *args)
    assert restored_collector.base_loss == fresh_collector.base_loss  # both start from the same weights
    restored, fresh = restored_collector.run(0, [6, 10]), fresh_collector.run(0, [6, 10])
    assert restored.cumulative[0] != pytest.approx(fresh.cumulative[0], abs=1e-7)


def test_random_plan_is_seeded_uniform_and_distinct():
    plan = oracle_lib.random_plan(100, 50, 10, seed=3, block=1)
    assert plan.shape == (50, 10) and all(len(set(row)) == 10 for row in plan)
    assert (plan == oracle_lib.random_plan(100, 50, 10, seed=3, block=1)).all()
    assert not (plan == oracle_lib.random_plan(100, 50, 10, seed=3, block=2)).all()
    counts = np.bincount(oracle_lib.random_plan(20, 2000, 10, seed=0, block=0).ravel(), minlength=20)
    assert counts.min() > 0.85 * counts.mean()  # every context equally likely
    with pytest.raises(ValueError, match="exceeds the probe pool"):
        oracle_lib.random_plan(5, 1, 10, seed=0, block=0)


def test_check_labels_flags_broken_blocks(checkpoint):
    collector = _collector(checkpoint)
    results = [collector.run(i, [i, i + 1, i + 2]) for i in range(3)]
    ids = [f"s:{i}" for i in range(len(checkpoint["pool"]))]
    table = oracle_lib.results_table(results, 0, "random", ids)
    assert table.column("context_id").to_pylist()[1] == ["s:1", "s:2", "s:3"]
    assert oracle_lib.check_labels(table, 3, 3)[0]
    assert not oracle_lib.check_labels(table, 3, 4)[0]  # a missing trajectory
    broken = oracle_lib.results_table([oracle_lib.TrajectoryResult(9, [1, 1, 2], [0.1, 0.2, 0.3], 1.0)], 0,
                                      "random", ids)
    passed, details = oracle_lib.check_labels(broken, 3, 1)
    assert not passed and "not 3 distinct" in details["problems"]


def test_replay_recomputes_final_losses_and_fires_on_labels_the_checkpoint_does_not_give(checkpoint,
                                                                                         saved_checkpoint):  # T8
    model, optimizer, state = lm.load_checkpoint(saved_checkpoint, "cpu")
    collector = oracle_lib.OracleCollector(model, optimizer, checkpoint["reference"], checkpoint["pool"],
                                           state["optim_config"])
    plan = oracle_lib.random_plan(len(checkpoint["pool"]), 3, 4, seed=0, block=2)
    table = oracle_lib.results_table(list(collector.run_many([0, 1, 2], plan)), 2, "random",
                                     [f"s:{i}" for i in range(len(checkpoint["pool"]))])
    rows = oracle_lib.replay_rows(table.num_rows, 2, seed=0, block=2)
    assert len(rows) == 2 and np.array_equal(rows, oracle_lib.replay_rows(3, 2, seed=0, block=2))

    def replay(labels):
        return oracle_lib.replay_final_losses(labels, rows, saved_checkpoint, checkpoint["pool"],
                                              checkpoint["reference"], tolerance=1e-4, device="cpu")

    passed, details = replay(table)
    assert passed and details["replay_max_abs_difference"] < 1e-6, details
    assert [r["recomputed_final_loss"] for r in details["replayed"]] == \
        [r["stored_final_loss"] for r in details["replayed"]]
    # labels shifted consistently (final loss, last cumulative and marginal): they still telescope, so only the
    # replay can tell they are not what the checkpoint gives
    tampered = table.to_pylist()
    victim = tampered[rows[0]]
    victim["final_loss"] += 1e-3
    victim["cumulative"][-1] += 1e-3
    victim["marginal"][-1] += 1e-3
    tampered = pa.Table.from_pylist(tampered, schema=oracle_lib.ORACLE_SCHEMA)
    assert oracle_lib.check_labels(tampered, 4, 3)[0]
    passed, details = replay(tampered)
    assert not passed and f"trajectory {victim['trajectory_id']}: stored final_loss" in details["replay_problems"]
    assert details["replay_max_abs_difference"] == pytest.approx(1e-3, rel=1e-2)


def test_block_runs_the_same_in_one_process_or_in_replica_workers(checkpoint, tmp_path):
    import pyarrow.parquet as pq

    from groupmates_assets.lib.storage import Storage

    lm.save_checkpoint(tmp_path / "ckpt", checkpoint["model"], checkpoint["optimizer"], lm.get_shape("tiny"),
                       checkpoint["cfg"], step=6)
    np.save(tmp_path / "pool.npy", checkpoint["pool"])
    plan = oracle_lib.random_plan(len(checkpoint["pool"]), 3, 4, seed=0, block=1)
    tables = {}
    for workers in (1, 2):
        job = oracle_lib.BlockJob(
            storage_root=str(tmp_path / f"store{workers}"), out_dir="oracle/block-001",
            checkpoint_dir=str(tmp_path / "ckpt"), pool_path=str(tmp_path / "pool.npy"),
            reference_examples=checkpoint["reference"].examples,
            context_ids=[f"s:{i}" for i in range(len(checkpoint["pool"]))], plan=plan,
            trajectory_ids=np.arange(3, 6), block=1, part_size=2, torch_threads=1,
        )
        seen = []
        base = oracle_lib.run_block(job, list(range(job.parts)), workers,
                                    progress=lambda d, t, out=seen: out.append((d, t)))
        assert base is not None and seen[-1] == (3, 3)
        tables[workers] = pq.read_table([Storage(job.storage_root).path(job.part_path(n)) for n in range(job.parts)])
        assert oracle_lib.run_block(job, [], workers) is None  # nothing pending: nothing runs
    assert tables[1].sort_by("trajectory_id").equals(tables[2].sort_by("trajectory_id"))


def test_replicas_spread_over_gpus_only_when_the_device_is_left_open():
    assert [oracle_lib.replica_device(None, r, 4) for r in range(5)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3",
                                                                          "cuda:0"]
    assert oracle_lib.replica_device(None, 3, 1) is None  # one GPU (or none): lm.default_device()
    assert oracle_lib.replica_device(None, 3, 0) is None
    assert oracle_lib.replica_device("cpu", 3, 4) == "cpu"  # an explicit device wins


def test_labels_consistent_replays_the_block_and_fails_on_stored_labels_the_checkpoint_does_not_give(
        checkpoint, saved_checkpoint, tmp_path, monkeypatch):  # T8, as the oracle assets check it
    import dagster as dg

    from groupmates_assets import settings as settings_module
    from groupmates_assets.defs.resources import PlatformResource
    from groupmates_assets.defs.shared import collect_oracle_block
    from groupmates_assets.lib import layout
    from groupmates_assets.lib import reference_set as ref_lib
    from groupmates_assets.lib.storage import Storage
    from groupmates_assets_tests.conftest import use_profile

    name = use_profile(monkeypatch, settings_module.Profile(
        name="oracle-replay-test", description="the oracle block check on a tiny LM",
        lm=settings_module.LMProfile(torch_threads=1), oracle=settings_module.OracleProfile(replay_per_block=2)))
    storage = Storage(str(tmp_path / "store"))
    storage.put_dir(saved_checkpoint, layout.PROBE_CHECKPOINT_DIR, layout.PROBE_CHECKPOINT_FILES)
    pool = checkpoint["pool"]
    storage.write_numpy(f"{layout.PROBE_POOL_DIR}/contexts.npy", pool)
    storage.write_parquet(f"{layout.PROBE_POOL_DIR}/contexts.parquet",
                          pa.table({"context_id": [f"s:{i}" for i in range(len(pool))]}))
    examples = checkpoint["reference"].examples
    ref_lib.save_reference_set(ref_lib.ReferenceSet(examples, {}, ref_lib.reference_set_hash(examples)),
                               storage.path(layout.REFERENCE_FILE))
    platform = PlatformResource(storage_root=storage.root, profile=name)

    def collect() -> dg.AssetCheckResult:
        with dg.build_asset_context(partition_key="block-000") as context:
            result = collect_oracle_block(context, platform, root_dir=layout.ORACLE_RANDOM_DIR,
                                          plan=oracle_lib.random_plan(len(pool), 3, 3, seed=0, block=0),
                                          trajectory_ids=np.arange(3), policy="random",
                                          fingerprint_parts={"seed": 0, "per_block": 3})
        return result.check_results[0]

    check = collect()
    replayed = check.metadata["replayed"].value
    assert check.passed and len(replayed) == 2, check.metadata
    assert all(r["recomputed_final_loss"] == r["stored_final_loss"] for r in replayed)
    # a stored part rewritten with labels shifted consistently: they still telescope, the replay does not agree
    fingerprint = storage.read_json(f"{layout.ORACLE_RANDOM_DIR}/current.json")["fingerprint"]
    parts = storage.read_json(f"{layout.ORACLE_RANDOM_DIR}/{fingerprint}/block-000/_SUCCESS.json")["parts"]
    part = next(p for p in parts if storage.read_parquet(p)["trajectory_id"][0].as_py() == replayed[0]["trajectory_id"])
    rows = storage.read_parquet(part).to_pylist()
    victim = rows[0]
    victim["final_loss"] += 1e-3
    victim["cumulative"][-1] += 1e-3
    victim["marginal"][-1] += 1e-3
    storage.write_parquet(part, pa.Table.from_pylist(rows, schema=oracle_lib.ORACLE_SCHEMA))
    check = collect()  # every part exists: nothing is recomputed, the stored labels are checked
    assert not check.passed
    assert f"trajectory {victim['trajectory_id']}: stored final_loss" in check.metadata["replay_problems"].value
