
import warnings

# backfill_policy on @asset is marked beta in Dagster 1.13; the GPU assets rely on it on purpose (one run per shard).
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", module="dagster")
