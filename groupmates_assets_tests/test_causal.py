"""The causal check of the selection (`selection_influence`): paired group plans drawn only from each set's own
contexts, the summary's interval arithmetic, and groups run as oracle trajectories on a tiny checkpoint."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
import torch

from groupmates_assets.lib import causal, lm
from groupmates_assets.lib import oracle as oracle_lib
from groupmates_assets.lib.contexts import PoolContexts, ShardContexts
from groupmates_assets.lib.influence import encoder as enc
from groupmates_assets.lib.influence import model as im
from groupmates_assets.lib.influence import training as tr
from groupmates_assets.settings import METHOD

T = 4
CONTEXT_LEN = 9
METHOD_T = METHOD.trajectory_length


def _tokens(first_value: int, rows: int, context_len: int = CONTEXT_LEN) -> np.ndarray:
    """Row r holds first_value + r in every position, so a context's tokens say where it came from."""
    return np.repeat(np.arange(first_value, first_value + rows, dtype=np.uint32)[:, None], context_len, axis=1)


def _sets() -> list[causal.GroupSet]:
    """A pool of two shards (each with a padded tail context) and two method corpora with a padded context 0."""
    pool = PoolContexts([ShardContexts("shard-a", _tokens(5000, 12), pad_context=11),
                         ShardContexts("shard-b", _tokens(6000, 9), pad_context=8)])
    sets = [causal.GroupSet(causal.POOL, len(pool), pool.gather, pool.context_id)]
    for name, first in (("group_mates", 1000), ("mates", 2000)):
        tokens = _tokens(first, 15)
        sets.append(causal.GroupSet.from_rows(name, tokens, np.arange(1, 15), f"{name}:fp"))
    return sets


# -- the plan ------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_groups_come_only_from_their_own_set_and_never_from_a_padded_context():
    plan = causal.plan_groups(_sets(), groups=6, length=T, seed=3)
    ranges = {causal.POOL: [(5000, 5010), (6000, 6007)], "group_mates": [(1001, 1014)], "mates": [(2001, 2014)]}
    for name in plan.sets:
        values = plan.tokens[plan.trajectories(name)][..., 0]  # [groups, T] source values
        assert values.shape == (6, T)
        assert all(any(low <= v <= high for low, high in ranges[name]) for v in values.ravel()), name
        assert all(len(set(group)) == T for group in values)  # T distinct contexts per group
        assert (plan.tokens[plan.trajectories(name)] == values[..., None]).all()  # whole contexts, not mixed
    ids = plan.group_context_ids("mates")
    assert all(i.startswith("mates:fp:") and i != "mates:fp:0" for group in ids for i in group)
    assert all(i.split(":")[0] in ("shard-a", "shard-b") for group in plan.group_context_ids(causal.POOL)
               for i in group)
    assert not {"shard-a:11", "shard-b:8"} & {i for group in plan.group_context_ids(causal.POOL) for i in group}


@pytest.mark.unit
def test_groups_are_paired_by_seed_and_deterministic():
    plan = causal.plan_groups(_sets(), groups=5, length=T, seed=7)
    again = causal.plan_groups(_sets(), groups=5, length=T, seed=7)
    other = causal.plan_groups(_sets(), groups=5, length=T, seed=8)
    assert np.array_equal(plan.tokens, again.tokens) and plan.context_ids == again.context_ids
    assert not np.array_equal(plan.tokens, other.tokens)
    # group g of every set is drawn by the generator seeded by (seed, g): equal-size sets draw the same rows
    assert np.array_equal(plan.set_rows["group_mates"], plan.set_rows["mates"])
    for g in range(5):
        expected = np.random.default_rng([7, g]).choice(19, size=T, replace=False)
        assert np.array_equal(plan.set_rows[causal.POOL][g], expected)
    # a larger N keeps the first groups
    larger = causal.plan_groups(_sets(), groups=8, length=T, seed=7)
    assert np.array_equal(larger.set_rows["mates"][:5], plan.set_rows["mates"])


@pytest.mark.unit
def test_a_set_smaller_than_a_group_is_a_clear_error():
    tiny = causal.GroupSet.from_rows("fasttext", _tokens(0, 3), np.arange(3), "fasttext:fp")
    with pytest.raises(ValueError, match="group of 4 contexts needs at least 4 contexts, the set holds 3"):
        causal.plan_groups([tiny], groups=2, length=T, seed=0)


# -- the summary ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_summary_differences_intervals_and_spearman_on_hand_made_influences():
    pool = np.array([0.10, 0.20, 0.30, 0.40, 0.50, 0.60])
    actual = {causal.POOL: pool, "group_mates": pool - 0.05,  # every paired difference is exactly -0.05
              "mates": pool + np.array([-0.3, 0.3, -0.2, 0.2, -0.1, 0.1])}  # mean difference 0, wide spread
    predicted = {causal.POOL: pool * 2, "group_mates": -(pool - 0.05), "mates": np.zeros(6)}
    summary = causal.summarize(actual, predicted, seed=1)
    rows = summary["sets"]
    assert rows["group_mates"]["groups"] == 6
    assert rows["group_mates"]["mean_actual"] == pytest.approx(0.30)
    diff = rows["group_mates"]["minus_baseline"]
    assert (diff["estimate"], diff["low"], diff["high"]) == pytest.approx((-0.05, -0.05, -0.05))
    wide = rows["mates"]["minus_baseline"]
    assert wide["estimate"] == pytest.approx(0.0, abs=1e-12) and wide["low"] < 0 < wide["high"]
    assert "minus_baseline" not in rows[causal.POOL]
    assert rows[causal.POOL]["spearman"] == pytest.approx(1.0)
    assert rows["group_mates"]["spearman"] == pytest.approx(-1.0)
    assert np.isnan(rows["mates"]["spearman"])  # a constant prediction has no rank correlation
    assert "negative" in summary["note"] and "beneficial" in summary["note"]


@pytest.mark.unit
def test_every_method_is_also_compared_with_the_reference_methods_paired_by_group():
    pool = np.array([0.10, 0.20, 0.30, 0.40])
    mates = pool - 0.10
    actual = {causal.POOL: pool, "group_mates": mates - 0.02, "mates": mates, "fasttext": mates + 0.3}
    predicted = {name: np.arange(4.0) for name in actual}
    summary = causal.summarize(actual, predicted, references=("mates",))
    rows = summary["sets"]
    assert summary["references"] == ["mates"] and rows["mates"]["minus"] == {}
    minus = rows["group_mates"]["minus"]["mates"]
    assert (minus["estimate"], minus["low"], minus["high"]) == pytest.approx((-0.02, -0.02, -0.02))
    assert rows["fasttext"]["minus"]["mates"]["estimate"] == pytest.approx(0.3)
    assert rows[causal.POOL]["minus"]["mates"]["estimate"] == pytest.approx(0.1)
    text = causal.to_markdown({"length": 10, "base_loss": 3.0, "summary": summary,
                               "order": [causal.POOL, "group_mates", "mates", "fasttext"]})
    assert "| minus mates [95% interval] |" in text
    assert next(line for line in text.splitlines() if line.startswith("| group_mates |")).endswith(
        "| -0.0200 [-0.0200, -0.0200] (more beneficial) | +1.000 |")
    assert "| +0.3000 [+0.3000, +0.3000] (less beneficial) |" in next(
        line for line in text.splitlines() if line.startswith("| fasttext |"))
    assert "| (reference) |" in next(line for line in text.splitlines() if line.startswith("| mates |"))
    with pytest.raises(ValueError, match="no groups for the reference 'random'"):
        causal.summarize(actual, predicted, references=("random",))


@pytest.mark.unit
def test_summary_refuses_unpaired_or_non_finite_influences():
    with pytest.raises(ValueError, match="'mates': 2 actual influences"):
        causal.summarize({causal.POOL: [0.1, 0.2, 0.3], "mates": [0.1, 0.2]}, {causal.POOL: [0] * 3, "mates": [0] * 2})
    with pytest.raises(ValueError, match="finite: False"):
        causal.summarize({causal.POOL: [0.1, 0.2], "mates": [0.1, float("nan")]},
                         {causal.POOL: [0, 1], "mates": [0, 1]})
    with pytest.raises(ValueError, match="no groups for the baseline"):
        causal.summarize({"mates": [0.1]}, {"mates": [0.1]})


@pytest.mark.unit
def test_markdown_names_the_sign_the_interval_and_the_verdict_it_supports():
    pool = [0.1, 0.2, 0.3]
    summary = causal.summarize({causal.POOL: pool, "group_mates": [-0.2, -0.1, 0.0], "mates": [0.3, 0.0, 0.3]},
                               {causal.POOL: [1, 2, 3], "group_mates": [3, 2, 1], "mates": [1, 2, 3]})
    text = causal.to_markdown({"length": 10, "base_loss": 3.25, "summary": summary})
    assert "negative change of the reference loss = beneficial" in text
    group_mates = next(line for line in text.splitlines() if line.startswith("| group_mates |"))
    assert "| 3 | -0.1000 | -0.3000 [-0.3000, -0.3000] (more beneficial) |" in group_mates
    mates = next(line for line in text.splitlines() if line.startswith("| mates |"))
    assert "no detectable difference" in mates
    assert "| random groups of the filtered pool | 3 |" in text and "over all 9 groups" in text


@pytest.mark.unit
def test_predicted_group_influence_is_the_sum_of_predictions_in_loss_units():
    trajectories = np.arange(6).reshape(2, 3)
    z = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, 2.0]])
    predicted = causal.predicted_group_influence(lambda rows: z[rows[:, 0] // 3], trajectories, label_mean=0.01,
                                                 label_std=0.1)
    assert predicted == pytest.approx([0.05 + 0.03, 0.4 + 0.03])


# -- end to end on a tiny checkpoint ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LM trained a few steps and saved as a checkpoint, three sets of random contexts, a reference set."""
    torch.manual_seed(0)
    shape = lm.get_shape("tiny")
    cfg = lm.OptimConfig(lr=3e-3, warmup_steps=2, total_steps=20, final_lr=3e-4)
    model = lm.build_model(shape, seed=1)
    optimizer = lm.make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    vocab = 512  # a small slice of the vocabulary, so a few steps visibly change the reference loss
    contexts = {name: rng.integers(0, vocab, size=(12, shape.seq_len + 1)).astype(np.uint32)
                for name in (causal.POOL, "group_mates", "mates")}
    lm.pretrain(model, optimizer, (torch.from_numpy(contexts[causal.POOL][i:i + 4].astype(np.int64))
                                   for i in range(0, 8, 4)), cfg, steps=2)
    directory = tmp_path_factory.mktemp("causal")
    lm.save_checkpoint(directory / "checkpoint", model, optimizer, shape, cfg, step=2)
    examples = []
    for _ in range(8):
        ids = rng.integers(0, vocab, size=16).tolist()
        examples.append((ids, [-100] * 11 + ids[11:]))
    sets = [causal.GroupSet.from_rows(name, tokens, np.arange(len(tokens)), name) for name, tokens in contexts.items()]
    plan = causal.plan_groups(sets, groups=3, length=T, seed=0)
    np.save(directory / "contexts.npy", plan.tokens)
    job = causal.GroupJob(str(directory / "checkpoint"), str(directory / "contexts.npy"), examples, torch_threads=1,
                          device="cpu")
    return {"plan": plan, "job": job, "examples": examples}


def _run(tiny, names, workers: int = 1) -> dict[str, tuple[list[float], float]]:
    finished: dict[str, tuple[list[float], float]] = {}
    causal.run_sets(tiny["job"], tiny["plan"], names, workers, on_set=lambda n, a, b: finished.__setitem__(n, (a, b)))
    return finished


@pytest.mark.integration
def test_groups_run_as_oracle_trajectories_and_reconcile(tiny):
    plan = tiny["plan"]
    finished = _run(tiny, list(plan.sets))
    assert list(finished) and set(finished) == set(plan.sets)
    assert all(len(actual) == 3 and np.isfinite(actual).all() for actual, _ in finished.values())
    assert len({round(a, 9) for actual, _ in finished.values() for a in actual}) == 9  # groups differ
    # the final change equals the last cumulative label of the same group run step by step by the collector
    model, optimizer, state = lm.load_checkpoint(tiny["job"].checkpoint_dir, "cpu")
    collector = oracle_lib.OracleCollector(model, optimizer, lm.ReferenceBatch(tiny["examples"]), plan.tokens,
                                           state["optim_config"])
    rows = plan.trajectories("mates")[1]
    assert finished["mates"][0][1] == pytest.approx(collector.run(0, rows).cumulative[-1], abs=1e-6)
    assert finished["mates"][1] == pytest.approx(collector.base_loss)
    # a rerun of only the missing sets runs only those (resume set by set)
    assert set(_run(tiny, ["group_mates"])) == {"group_mates"}


@pytest.mark.integration
def test_replica_workers_give_the_single_process_influences(tiny):
    single = _run(tiny, ["pool", "mates"])
    replicas = _run(tiny, ["pool", "mates"], workers=2)
    for name in single:
        assert replicas[name][0] == pytest.approx(single[name][0], abs=1e-6)


@pytest.mark.integration
def test_predictions_and_summary_reconcile_with_the_groups(tiny):
    plan = tiny["plan"]
    source = enc.resolve_encoder(None)
    torch.manual_seed(0)
    model = im.build_model(source, im.InfluenceModelConfig(chunk_len=8, chunks=2, encoder_layers=1)).eval()
    model.config.label_mean, model.config.label_std = 0.01, 0.5
    texts = [f"context {i}: " + " ".join(f"word{t % 97}" for t in row[:12]) for i, row in enumerate(plan.tokens)]
    predicted = causal.predicted_by_set(model, enc.load_encoder_tokenizer(source), texts, plan)
    docs = enc.chunk_documents(enc.load_encoder_tokenizer(source), texts, 8, 2)
    expected = (tr.predict(model, docs, plan.trajectories("mates")) * 0.5 + 0.01).sum(axis=1)
    assert predicted["mates"] == pytest.approx(expected.tolist(), rel=1e-5)
    finished = _run(tiny, list(plan.sets))
    summary = causal.summarize({n: finished[n][0] for n in plan.sets}, predicted)
    assert {n: r["groups"] for n, r in summary["sets"].items()} == {n: 3 for n in plan.sets}
    assert all(np.isfinite(r["mean_actual"]) for r in summary["sets"].values())
    for name in ("group_mates", "mates"):
        diff = summary["sets"][name]["minus_baseline"]
        paired = np.mean(np.array(finished[name][0]) - np.array(finished[causal.POOL][0]))
        assert diff["estimate"] == pytest.approx(paired) and diff["low"] <= paired <= diff["high"]


@pytest.mark.unit
def test_the_asset_reads_every_input_and_the_report_reads_it():
    from groupmates_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey("selection_influence"))
    assert {k.to_user_string() for k in node.parent_keys} == {
        "probe_checkpoint", "reference_set", "influence_model_final", "tokenized_corpus", "tokenized_pool_shard"}
    assert dg.AssetKey("selection_influence") in graph.get(dg.AssetKey("selection_report")).parent_keys


# -- the asset, materialized with Dagster on hand-made upstream outputs ---------------------------------------------
def _write_upstream(storage, tiny, tmp_path) -> None:
    """What the upstream assets leave in storage: tokenized pool shards, two tokenized corpora, the probe
    checkpoint, the reference set and a final influence model (each stage's own tests cover how they are made)."""
    import shutil

    from groupmates_assets.lib import layout
    from groupmates_assets.lib import reference_set as ref_lib
    from groupmates_assets.testing.pool_to_selection import save_influence_models, seed_influence_models

    rng = np.random.default_rng(5)
    context_len = lm.get_shape("tiny").seq_len + 1
    for key in ("web-a", "web-b"):
        info = storage.write_numpy(f"tokenized_pool/{key}/contexts.npy",
                                   rng.integers(0, 512, size=(8, context_len)).astype(np.uint32))
        storage.write_json(f"tokenized_pool/{key}/manifest.json", {"shard_key": key, "pad_context": 7,
                                                                   "files": {"contexts": info.as_metadata()}})
    storage.write_numpy("tokenized_pool/stale/contexts.npy", np.zeros((8, context_len), np.uint32))
    for method in ("group_mates", "mates"):
        out = f"{layout.corpus_dir(method)}/fp-{method}"
        storage.write_numpy(f"{out}/contexts.npy", rng.integers(0, 512, size=(12, context_len)).astype(np.uint32))
        storage.write_json(f"{out}/manifest.json", {"pad_context": 11})
        layout.write_pointer(storage, layout.corpus_dir(method), {"fingerprint": f"fp-{method}", "path": out})
    checkpoint = tiny["job"].checkpoint_dir
    for name in layout.PROBE_CHECKPOINT_FILES:
        storage.put_file(f"{checkpoint}/{name}", f"{layout.PROBE_CHECKPOINT_DIR}/{name}")
    local = str(tmp_path / "reference.jsonl")
    examples = tiny["examples"]
    ref_lib.save_reference_set(ref_lib.ReferenceSet(examples, {"source": "test"}, ref_lib.reference_set_hash(examples)),
                               local)
    storage.put_file(local, layout.REFERENCE_FILE)
    save_influence_models(tmp_path / "models")
    seed_influence_models(storage, tmp_path / "models")
    shutil.rmtree(tmp_path / "models")


@pytest.mark.integration
def test_the_asset_runs_end_to_end_resumes_and_reconciles(tiny, tmp_path, monkeypatch):
    import dataclasses

    from groupmates_assets import settings as settings_module
    from groupmates_assets.defs.causal.assets import selection_influence
    from groupmates_assets.defs.partitions import pool_shards
    from groupmates_assets.defs.resources import PlatformResource
    from groupmates_assets.lib import layout
    from groupmates_assets.lib.storage import Storage
    from groupmates_assets_tests.conftest import use_profile

    base = settings_module.get_profile()
    profile = dataclasses.replace(base, name="causal-test", lm=dataclasses.replace(base.lm, torch_threads=1),
                                  causal=settings_module.CausalProfile(groups=2, methods=("group_mates", "mates"),
                                                                       workers=1))
    use_profile(monkeypatch, profile)
    storage = Storage(str(tmp_path / "store"))
    _write_upstream(storage, tiny, tmp_path)
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions(pool_shards.name, ["web-a", "web-b"])
        platform = PlatformResource(storage_root=storage.root, profile=profile.name)

        def materialize() -> dict:
            result = dg.materialize([selection_influence], instance=instance, resources={"platform": platform})
            return result.asset_materializations_for_node("selection_influence")[0].metadata

        first = materialize()
        result = storage.read_json(layout.current_causal(storage)["path"])
        assert result["order"] == [causal.POOL, "group_mates", "mates"]
        assert sorted(result["sets"]) == sorted(result["order"])
        for name, entry in result["sets"].items():
            assert len(entry["actual"]) == len(entry["predicted"]) == 2, name
            assert np.isfinite(entry["actual"]).all() and np.isfinite(entry["predicted"]).all()
            ids = [i for group in entry["context_ids"] for i in group]
            assert len(ids) == 2 * METHOD_T
            if name == causal.POOL:
                assert all(i.split(":")[0] in ("web-a", "web-b") and not i.endswith(":7") for i in ids)
            else:
                assert all(i.startswith(f"{name}:fp-{name}:") and not i.endswith(":11") for i in ids)
        assert first["computed_groups"].value == 6 and first["groups_per_set"].value == 2
        assert "minus random groups" in first["table"].value
        # a rerun recomputes nothing and gives the same result; a lost set is recomputed alone
        assert materialize()["computed_groups"].value == 0
        assert storage.read_json(layout.current_causal(storage)["path"]) == result
        storage.remove(f"{layout.CAUSAL_DIR}/{result['fingerprint']}/actual-mates.json")
        assert materialize()["computed_groups"].value == 2
        assert storage.read_json(layout.current_causal(storage)["path"]) == result
