"""Jobs: the units a user launches, a sensor requests, or the demo command runs, generated from one table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import dagster as dg

from groupmates_assets.defs.partitions import (
    oracle_bootstrap_blocks,
    oracle_random_blocks,
    pool_shards,
    selection_methods,
    selection_ranges,
)

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


def stage_job(name: str, selection: list[str], partitions_def: dg.PartitionsDefinition | None = None,
              description: str | None = None) -> UnresolvedAssetJobDefinition:
    """An asset job over named assets; partitioned jobs take the partitions their assets share."""
    return dg.define_asset_job(name, selection=selection, partitions_def=partitions_def, description=description)


# In pipeline order: pool, quality, tokenize, oracle, influence, selection, corpus, pretrain, evaluation, causal,
# report.
ALL_JOBS = [
    stage_job("embedded_pool_job", ["embedded_pool"]),
    stage_job("register_pool_shards_job", ["pool_shard"], pool_shards),
    stage_job("quality_classifier_job", ["quality_classifier"]),
    stage_job("filter_pool_job", ["pool_shard", "filtered_pool_shard"], pool_shards,
              "Register one pool shard and filter it with the current quality classifier."),
    stage_job("filter_shards_job", ["filtered_pool_shard"], pool_shards,
              "Filter already-registered pool shards with the current quality classifier."),
    stage_job("filtered_pool_summary_job", ["filtered_pool_summary"]),
    stage_job("tokenize_shards_job", ["tokenized_pool_shard"], pool_shards,
              "Tokenize and pack filtered shards into LM contexts."),
    stage_job("oracle_inputs_job", ["reference_set", "probe_pool", "probe_checkpoint"], None,
              "Everything the oracle needs: reference set, probe pool, and the pretrained probe checkpoint."),
    stage_job("oracle_random_job", ["oracle_random"], oracle_random_blocks,
              "Collect oracle influences for one block of random trajectories."),
    stage_job("influence_model_init_job", ["influence_model_init", "bootstrap_trajectories"], None,
              "Train the initial relational model on the random oracle and search bootstrap trajectories with it."),
    stage_job("oracle_bootstrap_job", ["oracle_bootstrap"], oracle_bootstrap_blocks,
              "Collect oracle influences for one block of bootstrap trajectories."),
    stage_job("influence_models_job",
              ["influence_model_final", "individual_influence_model", "influence_model_report"], None,
              "Train the final relational model and the MATES individual model on random + bootstrap oracles, "
              "and compare all three on held-out trajectories."),
    stage_job("pool_predictions_job", ["pool_predictions"], pool_shards,
              "Score the filtered documents of one shard with the final and the individual influence model."),
    stage_job("cluster_centroids_job", ["cluster_centroids"]),
    stage_job("cluster_assignments_job", ["cluster_assignments"], pool_shards,
              "Assign one shard's documents to their nearest centroid."),
    stage_job("select_documents_job", ["selected_documents"], selection_ranges,
              "Group-MATES greedy selection inside one range of clusters."),
    stage_job("baselines_job", ["selected_random", "selected_mates", "selected_fasttext"], None,
              "Random, MATES and fastText selections with Group-MATES' budget."),
    stage_job("budget_policies_job", ["selected_weighted", "selected_global"], None,
              "Group-MATES with influence-weighted and global cluster budgets, cut from the greedy sequences of "
              "selected_documents."),
    stage_job("selected_corpus_job", ["selected_corpus"], pool_shards,
              "Write one shard's selected documents for every method, joined by doc_id."),
    stage_job("tokenized_corpus_job", ["tokenized_corpus"], selection_methods,
              "Tokenize and order one selection method's corpus for training."),
    stage_job("pretrain_job", ["pretrain_checkpoints"], selection_methods,
              "Train the target LM on one method's tokenized corpus, every seed (stage 2 from the probe checkpoint "
              "with S = 2, from scratch with S = 1); resumes from the last checkpoints."),
    stage_job("evaluation_job", ["evaluation"], selection_methods,
              "Evaluate the LM trained on one method's corpus on offline tasks and held-out text."),
    stage_job("selection_influence_job", ["selection_influence"], None,
              "Causal check: actual reference-loss change of groups from each method's selection against random "
              "groups of the filtered pool, at the probe checkpoint."),
    stage_job("selection_report_job", ["selection_report"], None,
              "Compare Group-MATES with random, MATES and fastText-only selection at equal tokens."),
]
JOBS = {job.name: job for job in ALL_JOBS}

# The pool sensor requests these two by object.
filter_pool_job = JOBS["filter_pool_job"]
filter_shards_job = JOBS["filter_shards_job"]
