"""Partition definitions shared across stages."""

import dagster as dg

# One partition per raw pool shard file; keys come from file names (see lib.shards.shard_key_for).
pool_shards = dg.DynamicPartitionsDefinition(name="pool_shards")
