"""The groupmates-assets code location: every stage's assets, checks, jobs and sensors."""

from __future__ import annotations

import dagster as dg

from groupmates_assets.defs import jobs
from groupmates_assets.defs.corpus import assets as corpus_assets
from groupmates_assets.defs.deployment import executor_for
from groupmates_assets.defs.evaluation import assets as evaluation_assets
from groupmates_assets.defs.influence import assets as influence_assets
from groupmates_assets.defs.lm import assets as lm_assets
from groupmates_assets.defs.oracle import assets as oracle_assets
from groupmates_assets.defs.pool import assets as pool_assets
from groupmates_assets.defs.pool import sensors as pool_sensors
from groupmates_assets.defs.pretrain import assets as pretrain_assets
from groupmates_assets.defs.quality import assets as quality_assets
from groupmates_assets.defs.report import assets as report_assets
from groupmates_assets.defs.resources import platform_from_env, s3_from_env
from groupmates_assets.defs.selection import assets as selection_assets
from groupmates_assets.defs.tokenize import assets as tokenize_assets

STAGES = [pool_assets, quality_assets, tokenize_assets, lm_assets, oracle_assets, influence_assets,
          selection_assets, corpus_assets, pretrain_assets, evaluation_assets, report_assets]


def build_definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=dg.load_assets_from_modules(STAGES),
        asset_checks=dg.load_asset_checks_from_modules(STAGES),
        jobs=jobs.ALL_JOBS,
        sensors=[pool_sensors.pool_shard_sensor],
        schedules=[pool_sensors.missing_shards_backfill],
        resources={
            "platform": platform_from_env(),
            "s3": s3_from_env(),  # dagster-aws S3Resource (boto3) for users' own ops; same endpoint/region as platform
        },
        executor=executor_for(),
    )


defs = build_definitions()
