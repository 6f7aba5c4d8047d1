
import warnings

# backfill_policy on @asset is marked beta in Dagster 1.13; the per-shard assets rely on it on purpose (several
# shards per run, defs/common.py::shard_batches) and the GPU assets too (one run per oracle block or method).
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", module="dagster")
