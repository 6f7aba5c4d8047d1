"""Jobs: the units a user launches, a sensor requests, or the demo command runs."""

import dagster as dg

from groupmates_assets.defs.partitions import oracle_random_blocks, pool_shards

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

ALL_JOBS = [embedded_pool_job, register_pool_shards_job, quality_classifier_job, filter_pool_job, filter_shards_job,
            filtered_pool_summary_job, tokenize_shards_job, oracle_inputs_job, oracle_random_job]
