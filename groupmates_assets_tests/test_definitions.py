"""The code location loads, with every stage's assets, checks, jobs and sensors."""

from __future__ import annotations

import dagster as dg

from groupmates_assets.definitions import build_definitions, defs


def test_all_definitions_load():
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"embedded_pool", "pool_shard", "quality_classifier", "filtered_pool_shard",
                    "filtered_pool_summary", "tokenized_pool_shard", "probe_checkpoint", "reference_set",
                    "probe_pool", "oracle_random", "influence_model_init", "bootstrap_trajectories",
                    "oracle_bootstrap", "influence_model_final", "individual_influence_model",
                    "influence_model_report", "pool_predictions", "cluster_centroids", "cluster_assignments",
                    "selected_documents", "selected_random", "selected_mates", "selected_fasttext",
                    "selected_corpus", "tokenized_corpus", "pretrain_checkpoints", "evaluation", "selection_report"}
    for job in ("embedded_pool_job", "register_pool_shards_job", "quality_classifier_job", "filter_pool_job",
                "filter_shards_job", "filtered_pool_summary_job", "tokenize_shards_job", "oracle_inputs_job",
                "oracle_random_job", "influence_model_init_job", "oracle_bootstrap_job", "influence_models_job",
                "pool_predictions_job", "cluster_centroids_job", "cluster_assignments_job", "select_documents_job",
                "baselines_job", "selected_corpus_job", "tokenized_corpus_job",
                "pretrain_job", "evaluation_job", "selection_report_job"):
        assert defs.resolve_job_def(job) is not None
    assert defs.resolve_sensor_def("pool_shard_sensor") is not None
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert {"counts_reconcile", "all_shards_reconcile", "every_token_once", "labels_consistent",
            "tails_separated", "budgets_exact", "quality_signal", "index_round_trip",
            "every_document_every_pass"} <= checks


def test_every_asset_has_a_code_version_group_and_description():
    for node in defs.resolve_asset_graph().asset_nodes:
        assert node.code_version, node.key
        assert node.group_name in {"pool", "quality", "tokenize", "lm", "oracle", "influence",
                                   "selection", "corpus", "pretrain", "evaluation", "report"}, node.key
        assert node.description, node.key


def test_environment_configures_storage_and_pool(monkeypatch, tmp_path):
    monkeypatch.setenv("GROUPMATES_STORAGE_ROOT", str(tmp_path / "store"))
    monkeypatch.setenv("GROUPMATES_POOL_DIR", str(tmp_path / "pool"))
    platform = build_definitions().resources["platform"]
    assert platform.storage().root == str(tmp_path / "store")
    assert platform.pool_location()[1] == str(tmp_path / "pool")
