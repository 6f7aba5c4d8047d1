"""Jobs: the units a user launches, a sensor requests, or the demo command runs."""

import dagster as dg

from groupmates_assets.defs.partitions import (
    oracle_bootstrap_blocks,
    oracle_random_blocks,
    pool_shards,
    selection_methods,
    selection_ranges,
)

embedded_pool_job = dg.define_asset_job("embedded_pool_job", selection=["embedded_pool"])
register_pool_shards_job = dg.define_asset_job(
    "register_pool_shards_job", selection=["pool_shard"], partitions_def=pool_shards
)
quality_classifier_job = dg.define_asset_job("quality_classifier_job", selection=["quality_classifier"])
filter_pool_job = dg.define_asset_job(
    "filter_pool_job", selection=["pool_shard", "filtered_pool_shard"], partitions_def=pool_shards,
    description="Register one pool shard and filter it with the current quality classifier.",
)
filtered_pool_summary_job = dg.define_asset_job("filtered_pool_summary_job", selection=["filtered_pool_summary"])
filter_shards_job = dg.define_asset_job(
    "filter_shards_job", selection=["filtered_pool_shard"], partitions_def=pool_shards,
    description="Filter already-registered pool shards with the current quality classifier.",
)
tokenize_shards_job = dg.define_asset_job(
    "tokenize_shards_job", selection=["tokenized_pool_shard"], partitions_def=pool_shards,
    description="Tokenize and pack filtered shards into LM contexts.",
)
oracle_inputs_job = dg.define_asset_job(
    "oracle_inputs_job", selection=["reference_set", "probe_pool", "probe_checkpoint"],
    description="Everything the oracle needs: reference set, probe pool, and the pretrained probe checkpoint.",
)
oracle_random_job = dg.define_asset_job(
    "oracle_random_job", selection=["oracle_random"], partitions_def=oracle_random_blocks,
    description="Collect oracle influences for one block of random trajectories.",
)

influence_model_init_job = dg.define_asset_job(
    "influence_model_init_job", selection=["influence_model_init", "bootstrap_trajectories"],
    description="Train the initial relational model on the random oracle and search bootstrap trajectories with it.",
)
oracle_bootstrap_job = dg.define_asset_job(
    "oracle_bootstrap_job", selection=["oracle_bootstrap"], partitions_def=oracle_bootstrap_blocks,
    description="Collect oracle influences for one block of bootstrap trajectories.",
)
influence_models_job = dg.define_asset_job(
    "influence_models_job",
    selection=["influence_model_final", "individual_influence_model", "influence_model_report"],
    description="Train the final relational model and the MATES individual model on random + bootstrap oracles, "
    "and compare all three on held-out trajectories.",
)

pool_predictions_job = dg.define_asset_job(
    "pool_predictions_job", selection=["pool_predictions"], partitions_def=pool_shards,
    description="Score the filtered documents of one shard with the final and the individual influence model.",
)
cluster_centroids_job = dg.define_asset_job("cluster_centroids_job", selection=["cluster_centroids"])
cluster_assignments_job = dg.define_asset_job(
    "cluster_assignments_job", selection=["cluster_assignments"], partitions_def=pool_shards,
    description="Assign one shard's documents to their nearest centroid.",
)
select_documents_job = dg.define_asset_job(
    "select_documents_job", selection=["selected_documents"], partitions_def=selection_ranges,
    description="Group-MATES greedy selection inside one range of clusters.",
)
baselines_job = dg.define_asset_job(
    "baselines_job", selection=["selected_random", "selected_mates", "selected_fasttext"],
    description="Random, MATES and fastText selections with Group-MATES' budget.",
)
selected_corpus_job = dg.define_asset_job(
    "selected_corpus_job", selection=["selected_corpus"], partitions_def=pool_shards,
    description="Write one shard's selected documents for every method, joined by doc_id.",
)

tokenized_corpus_job = dg.define_asset_job(
    "tokenized_corpus_job", selection=["tokenized_corpus"], partitions_def=selection_methods,
    description="Tokenize and order one selection method's corpus for training.",
)

pretrain_job = dg.define_asset_job(
    "pretrain_job", selection=["pretrain_checkpoints"], partitions_def=selection_methods,
    description="Train the target LM on one method's tokenized corpus, every seed (stage 2 from the probe checkpoint "
    "with S = 2, from scratch with S = 1); resumes from the last checkpoints.",
)

evaluation_job = dg.define_asset_job(
    "evaluation_job", selection=["evaluation"], partitions_def=selection_methods,
    description="Evaluate the LM trained on one method's corpus on offline tasks and held-out text.",
)

selection_report_job = dg.define_asset_job(
    "selection_report_job", selection=["selection_report"],
    description="Compare Group-MATES with random, MATES and fastText-only selection at equal tokens.",
)

ALL_JOBS = [embedded_pool_job, register_pool_shards_job, quality_classifier_job, filter_pool_job, filter_shards_job,
            filtered_pool_summary_job, tokenize_shards_job, oracle_inputs_job, oracle_random_job,
            influence_model_init_job, oracle_bootstrap_job, influence_models_job, pool_predictions_job,
            cluster_centroids_job, cluster_assignments_job, select_documents_job, baselines_job, selected_corpus_job,
            tokenized_corpus_job, pretrain_job, evaluation_job, selection_report_job]
