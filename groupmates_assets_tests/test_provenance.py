"""`groupmates provenance`: the upstream chain, run ids, code and data versions and parameters read back from an
instance, on a tiny graph shaped like the selection stage, and on the project's own graph through the CLI."""

import argparse
import json

import dagster as dg
import pytest

from groupmates_assets import provenance as pv

pytestmark = pytest.mark.unit

SHARDS = dg.StaticPartitionsDefinition(["a", "b"])
ALL = dg.AllPartitionMapping()
SELECTIONS = "selected_documents,selected_random"  # materialized in one run
TINY_PARAMETERS = {
    "classifier": ["threshold", "recipe.bigrams"],
    "selected_documents": ["ratio", "budget_rounding"],
    "corpus": ["selected_{method}", "sha256.{method}"],
}


@dg.asset(group_name="pool", code_version="raw-v1", partitions_def=SHARDS)
def raw(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"rows": 3, "format": "jsonl"},
                                data_version=dg.DataVersion(f"raw-{context.partition_key}"))


def _classifier(version: str):
    @dg.asset(name="classifier", group_name="quality", code_version=version,
              deps=[dg.AssetDep(raw, partition_mapping=ALL)])
    def classifier() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"threshold": 0.25, "recipe": dg.MetadataValue.json({"bigrams": True}),
                                              "path": dg.MetadataValue.path("classifier/model.bin")},
                                    data_version=dg.DataVersion("clf-1"))
    return classifier


classifier = _classifier("clf-v1")


@dg.asset(group_name="quality", code_version="filter-v1", partitions_def=SHARDS, deps=[raw, classifier])
def filtered(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"kept": 2}, data_version=dg.DataVersion(f"filtered-{context.partition_key}"))


@dg.asset(group_name="selection", code_version="sel-v1", deps=[dg.AssetDep(filtered, partition_mapping=ALL)])
def selected_documents() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"ratio": 0.5, "budget_rounding": "floor"}, data_version=dg.DataVersion("s1"))


@dg.asset(group_name="selection", code_version="random-v1", deps=[dg.AssetDep(filtered, partition_mapping=ALL)])
def selected_random() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"budget": 2})


@dg.asset(group_name="selection", code_version="corpus-v1", partitions_def=SHARDS,
          deps=[filtered, selected_documents, selected_random])
def corpus(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"selected_group_mates": 1, "selected_random": 1,
                                          "sha256": dg.MetadataValue.json({"group_mates": "abc", "random": "def"})},
                                data_version=dg.DataVersion(f"corpus-{context.partition_key}"))


ASSETS = [raw, classifier, filtered, selected_documents, selected_random, corpus]


def _graph(assets=ASSETS):
    return dg.Definitions(assets=assets).resolve_asset_graph()


def _materialize(instance, ids: dict[str, str], name: str, partitions=(None,)) -> None:
    """One run per partition of the assets named (comma-separated); their run ids under name[/partition]."""
    for key in partitions:
        run = dg.materialize(ASSETS, selection=name.split(","), partition_key=key, instance=instance)
        ids[name if key is None else f"{name}/{key}"] = run.run_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Everything materialized once, in dependency order, partition by partition; (instance, run ids). Read only:
    the tests that add runs build their own instance."""
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("instance"))) as instance:
        ids: dict[str, str] = {}
        for name in ("raw", "classifier", "filtered", SELECTIONS, "corpus"):
            _materialize(instance, ids, name, ("a", "b") if name in ("raw", "filtered", "corpus") else (None,))
        yield instance, ids


def test_chain_of_one_partition_with_runs_versions_and_parameters(runs):
    instance, ids = runs
    result = pv.trace(instance, _graph(), "corpus", partition="a", parameters=TINY_PARAMETERS)
    by_key = {a.key: a for a in result.assets}
    # The other methods' selections are not part of Group-MATES' lineage.
    assert [a.key for a in result.assets] == ["raw", "classifier", "filtered", "selected_documents", "corpus"]
    assert result.pruned == ["selected_random"]
    assert [a.level for a in result.assets] == [4, 3, 2, 1, 0]  # inputs before what consumes them
    assert by_key["corpus"].parents == ["filtered", "selected_documents"]
    # Identity-mapped parents show the same shard; everything else its latest record.
    assert (by_key["corpus"].partition, by_key["filtered"].partition, by_key["raw"].partition) == ("a", "a", "a")
    assert by_key["corpus"].latest.run_id == ids["corpus/a"]
    assert by_key["filtered"].latest.run_id == ids["filtered/a"]
    assert by_key["raw"].latest.run_id == ids["raw/a"]
    assert by_key["classifier"].latest.run_id == ids["classifier"]
    assert by_key["selected_documents"].latest.run_id == ids[SELECTIONS]
    # Partition counts and every partition's latest run, newest first.
    assert (by_key["raw"].partitions_materialized, by_key["raw"].partitions_total) == (2, 2)
    assert by_key["raw"].latest_run_ids == [ids["raw/b"], ids["raw/a"]]
    assert by_key["corpus"].latest_run_ids == [ids["corpus/b"], ids["corpus/a"]]
    # Code version of the definition and recorded at materialization, data versions from the assets.
    for asset, version in (("corpus", "corpus-v1"), ("filtered", "filter-v1"), ("classifier", "clf-v1"),
                           ("raw", "raw-v1"), ("selected_documents", "sel-v1")):
        assert by_key[asset].code_version == version and by_key[asset].recorded_code_versions == [version]
        assert by_key[asset].latest.code_version == version and by_key[asset].code_version_matches
    assert by_key["corpus"].latest.data_version == "corpus-a"
    assert by_key["raw"].latest.data_version == "raw-a"
    assert by_key["classifier"].latest.data_version == "clf-1"
    # Whitelisted parameters: plain, dotted into JSON, and per method.
    assert by_key["classifier"].latest.parameters == {"threshold": 0.25, "recipe.bigrams": True}
    assert by_key["selected_documents"].latest.parameters == {"ratio": 0.5, "budget_rounding": "floor"}
    assert by_key["corpus"].latest.parameters == {"selected_group_mates": 1, "sha256.group_mates": "abc"}
    assert by_key["raw"].latest.parameters == {"rows": 3, "format": "jsonl"}  # no list: short scalars
    # The exact parent records each materialization read (Dagster's input event pointers).
    assert by_key["corpus"].consumed["selected_documents"]["run_id"] == ids[SELECTIONS]
    assert by_key["filtered"].consumed["classifier"]["run_id"] == ids["classifier"]
    assert all(not a.inputs_changed_since for a in result.assets)


def test_other_method_all_partitions_and_json(runs):
    instance, ids = runs
    result = pv.trace(instance, _graph(), "corpus", method="random", parameters=TINY_PARAMETERS)
    by_key = {a.key: a for a in result.assets}
    assert set(by_key) == {"corpus", "filtered", "selected_random", "classifier", "raw"}
    assert result.partition is None and by_key["corpus"].partition is None
    assert by_key["corpus"].latest.run_id == ids["corpus/b"]  # newest of any partition
    assert by_key["corpus"].latest.parameters == {"selected_random": 1, "sha256.random": "def"}
    everything = pv.trace(instance, _graph(), "corpus", method=None)
    assert {a.key for a in everything.assets} == set(by_key) | {"selected_documents"} and not everything.pruned
    data = json.loads(json.dumps(result.to_json()))
    assert data["target"] == "corpus" and data["method"] == "random"
    assert {a["key"]: a["latest"]["run_id"] for a in data["assets"]}["selected_random"] == ids[SELECTIONS]


def test_a_budget_policy_keeps_the_group_mates_selection_it_is_cut_from(runs):
    """group_mates_weighted's selection is cut from selected_documents' sequences: its lineage keeps that asset,
    and Group-MATES' own lineage leaves the policy's asset out."""
    instance, _ = runs

    @dg.asset(name="selected_weighted", group_name="selection", code_version="weighted-v1",
              deps=[selected_documents])
    def selected_weighted() -> None:
        return None

    @dg.asset(name="corpus", group_name="selection", code_version="corpus-v1", partitions_def=SHARDS,
              deps=[filtered, selected_documents, selected_random, selected_weighted])
    def corpus_of_every_method() -> None:
        return None

    graph = _graph([raw, classifier, filtered, selected_documents, selected_random, selected_weighted,
                    corpus_of_every_method])
    weighted = pv.trace(instance, graph, "corpus", method="group_mates_weighted", parameters=TINY_PARAMETERS)
    assert {a.key for a in weighted.assets} == {"raw", "classifier", "filtered", "selected_documents",
                                               "selected_weighted", "corpus"}
    assert weighted.pruned == ["selected_random"]
    paper = pv.trace(instance, graph, "corpus", method="group_mates", parameters=TINY_PARAMETERS)
    assert "selected_weighted" not in {a.key for a in paper.assets} and "selected_weighted" in paper.pruned


def test_rematerialized_input_and_changed_code_version_are_flagged(tmp_path):
    changed = [_classifier("clf-v2") if a is classifier else a for a in ASSETS]
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        ids: dict[str, str] = {}
        for name in ("raw", "classifier", "filtered"):
            _materialize(instance, ids, name, ("a",) if name != "classifier" else (None,))
        first = ids["classifier"]
        _materialize(instance, ids, "classifier")
        _materialize(instance, ids, "raw", ("b",))  # another shard: not an input of filtered/a
        result = pv.trace(instance, _graph(changed), "filtered", partition="a", parameters=TINY_PARAMETERS)
        _materialize(instance, ids, "raw", ("a",))  # its own shard again: an input of filtered/a
        again = pv.trace(instance, _graph(changed), "filtered", partition="a", parameters=TINY_PARAMETERS)
    by_key = {a.key: a for a in result.assets}
    assert [a.key for a in result.assets] == ["raw", "classifier", "filtered"]
    assert by_key["classifier"].latest.run_id == ids["classifier"] != first
    assert by_key["classifier"].code_version == "clf-v2" and by_key["classifier"].recorded_code_versions == ["clf-v1"]
    assert not by_key["classifier"].code_version_matches
    assert by_key["filtered"].inputs_changed_since == ["classifier"]  # built from the classifier of the first run
    assert by_key["filtered"].consumed["classifier"]["run_id"] == first
    assert (by_key["raw"].partitions_materialized, by_key["raw"].partitions_total) == (2, 2)
    assert {a.key: a for a in again.assets}["filtered"].inputs_changed_since == ["classifier", "raw"]
    table = pv.render_table(result)
    assert "clf-v2 / clf-v1 (!)" in table and "rematerialized after this was built from them: classifier" in table
    assert ids["filtered/a"][:8] in table and "threshold=0.25" in table and "2/2 [a]" in table


def test_unknown_asset_partition_or_method_is_an_error(runs, capsys):
    instance, _ = runs
    for asset, partition, method in (("nope", None, "group_mates"), ("corpus", "z", "group_mates"),
                                     ("classifier", "a", "group_mates"), ("corpus", None, "best")):
        args = argparse.Namespace(asset=asset, partition=partition, method=method, all_methods=False, json=False)
        assert pv.command(args, instance, _graph()) == 2
    assert "no asset 'nope'" in capsys.readouterr().err


def test_cli_on_the_project_graph_reads_a_real_materialization(tmp_path, monkeypatch, capsys):
    """`groupmates provenance` on the project's definitions: the pruned chain of the selected corpus, and a shard's
    filtered pool traced to the pool_shard run that registered it."""
    from groupmates_assets import cli
    from groupmates_assets.defs.partitions import SELECTION_METHODS, pool_shards
    from groupmates_assets.defs.pool.assets import pool_shard
    from groupmates_assets.defs.resources import PlatformResource

    assert set(pv.METHOD_SELECTION_ASSETS) == set(SELECTION_METHODS)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("GROUPMATES_HOME", str(tmp_path))
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "crawl-a.jsonl").write_text('{"text": "a document"}\n')
    cli.prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(pool_shards.name, ["crawl-a"])
        platform = PlatformResource(storage_root=str(tmp_path / "store"), pool_dir=str(tmp_path / "pool"))
        run_id = dg.materialize([pool_shard], partition_key="crawl-a", instance=instance,
                                resources={"platform": platform}).run_id

    assert cli.main(["provenance", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    keys = {a["key"]: a for a in data["assets"]}
    assert data["target"] == "selected_corpus" and keys["selected_corpus"]["level"] == 0
    assert {"filtered_pool_shard", "selected_documents", "cluster_assignments", "pool_predictions",
            "influence_model_final", "oracle_random", "probe_checkpoint", "quality_classifier", "pool_shard",
            "embedded_pool"} <= set(keys)
    others = ["selected_fasttext", "selected_global", "selected_mates", "selected_random", "selected_weighted"]
    assert not set(others) & set(keys)
    assert sorted(data["pruned"]) == others
    assert keys["selected_corpus"]["latest"] is None and keys["pool_shard"]["latest"]["run_id"] == run_id

    assert cli.main(["provenance", "--asset", "filtered_pool_shard", "--partition", "crawl-a"]) == 0
    table = capsys.readouterr().out
    assert "Provenance of filtered_pool_shard (partition crawl-a" in table
    row = next(line for line in table.splitlines() if line.strip().startswith("pool_shard "))
    assert run_id[:8] in row and "pool-shard-v1" in row and "1/1 [crawl-a]" in row
    assert "not materialized" in next(line for line in table.splitlines() if "quality_classifier " in line)
    assert "format=jsonl" in table

    assert cli.main(["provenance", "--asset", "tokenized_corpus", "--method", "mates", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["partition"] == "mates" and "selected_mates" in {a["key"] for a in data["assets"]}
