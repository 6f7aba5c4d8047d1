"""The groupmates-assets code location: every stage's assets, checks, jobs and sensors."""

from __future__ import annotations

import dagster as dg

from groupmates_assets.defs import jobs
from groupmates_assets.defs.pool import assets as pool_assets
from groupmates_assets.defs.pool import sensors as pool_sensors
from groupmates_assets.defs.quality import assets as quality_assets
from groupmates_assets.defs.resources import platform_from_env


def build_definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=dg.load_assets_from_modules([pool_assets, quality_assets]),
        asset_checks=dg.load_asset_checks_from_modules([pool_assets, quality_assets]),
        jobs=[jobs.embedded_pool_job, jobs.register_pool_shards_job, jobs.quality_classifier_job,
              jobs.filter_pool_job, jobs.filter_shards_job, jobs.filtered_pool_summary_job],
        sensors=[pool_sensors.pool_shard_sensor],
        resources={"platform": platform_from_env()},
        executor=dg.in_process_executor,
    )


defs = build_definitions()
