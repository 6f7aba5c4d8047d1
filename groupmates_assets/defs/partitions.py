"""Partition definitions shared across stages.

The oracle, bootstrap and selection-range partitions are built once, at import, from the active profile
(``settings.active_profile_name``: GROUPMATES_PROFILE, validated); ``PlatformResource`` refuses runs that ask for
another profile, so a run's partition keys and its settings always come from the same profile.
"""

import dagster as dg

from groupmates_assets.lib import selection as selection_registry

# One partition per raw pool shard file; keys come from file names (see lib.shards.shard_key_for).
pool_shards = dg.DynamicPartitionsDefinition(name="pool_shards")


def oracle_block_keys(blocks: int) -> list[str]:
    return [f"block-{i:03d}" for i in range(blocks)]


def block_number(block_key: str) -> int:
    """``block-007`` -> 7 (keys come from a static partitions definition, so anything else is a bug)."""
    prefix, _, number = block_key.partition("-")
    if prefix != "block" or not (number.isascii() and number.isdigit()):
        raise ValueError(f"not an oracle block key: {block_key!r}")
    return int(number)


def oracle_blocks_for_profile() -> dg.StaticPartitionsDefinition:
    """Blocks of oracle trajectories (paper: 4 seeds x 5,000); the count comes from the active profile."""
    from groupmates_assets.settings import get_profile

    return dg.StaticPartitionsDefinition(oracle_block_keys(get_profile().oracle.blocks))


oracle_random_blocks = oracle_blocks_for_profile()


def oracle_bootstrap_blocks_for_profile() -> dg.StaticPartitionsDefinition:
    """Blocks of bootstrap trajectories (paper: 4 seeds, two per tail); the count comes from the active profile."""
    from groupmates_assets.settings import get_profile

    return dg.StaticPartitionsDefinition(oracle_block_keys(get_profile().oracle.bootstrap_blocks))


oracle_bootstrap_blocks = oracle_bootstrap_blocks_for_profile()


def selection_range_keys(ranges: int) -> list[str]:
    return [f"clusters-{i:03d}-of-{ranges:03d}" for i in range(ranges)]


def selection_ranges_for_profile() -> dg.StaticPartitionsDefinition:
    """Contiguous ranges of cluster ids selected in parallel; the count comes from the active profile."""
    from groupmates_assets.settings import get_profile

    return dg.StaticPartitionsDefinition(selection_range_keys(get_profile().selection.cluster_ranges))


selection_ranges = selection_ranges_for_profile()

# One partition per selection method whose corpus is tokenized (and, later, trained on and evaluated): the names
# of lib.selection's registry, in registration order.
SELECTION_METHODS = tuple(selection_registry.SELECTION_METHODS)
selection_methods = dg.StaticPartitionsDefinition(list(SELECTION_METHODS))
