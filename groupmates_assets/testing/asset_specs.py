"""The code location's shape as plain JSON: every asset's key, partitions, deps, checks, code version, group, kinds,
tags, pools and backfill policy, and what each job, sensor and schedule targets.

``groupmates_assets_tests/test_asset_specs.py`` compares it with the committed snapshot
(``groupmates_assets_tests/snapshots/asset_specs.json``), so a change to the graph shows up as a reviewed diff of
that file rather than in hand-kept lists of names. Printed by

    python -m groupmates_assets.testing.asset_specs

with the definitions as the environment leaves them: run it without GROUPMATES_* variables (the test does) to
get the defaults (the ``demo`` profile, the local deployment).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import dagster as dg


def partitions_spec(partitions_def: dg.PartitionsDefinition | None) -> dict[str, Any] | None:
    """Type and name of a partitions definition; static keys listed (they come from the profile), multi-partitions
    by dimension."""
    if partitions_def is None:
        return None
    spec: dict[str, Any] = {"type": type(partitions_def).__name__, "name": getattr(partitions_def, "name", None)}
    if isinstance(partitions_def, dg.StaticPartitionsDefinition):
        spec["keys"] = partitions_def.get_partition_keys()
    elif isinstance(partitions_def, dg.MultiPartitionsDefinition):
        spec["dimensions"] = {d.name: partitions_spec(d.partitions_def) for d in partitions_def.partitions_defs}
    return spec


def _keys(keys) -> list[str]:
    return sorted(key.to_user_string() for key in keys)


def asset_specs(defs: dg.Definitions) -> dict[str, Any]:
    """Everything the snapshot pins, sorted, as JSON-ready values."""
    repository = defs.get_repository_def()
    graph = repository.asset_graph
    assets = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "deps": _keys(node.parent_keys),
            "partitions": partitions_spec(node.partitions_def),
            "checks": {check.name: {"blocking": graph.get_check_spec(check).blocking} for check in node.check_keys},
            "code_version": node.code_version,
            "group": node.group_name,
            "kinds": sorted(node.kinds or []),
            "tags": dict(node.tags or {}),
            "owners": list(node.owners or []),
            "pools": sorted(node.pools or []),
            "backfill_policy": None if node.backfill_policy is None else str(node.backfill_policy),
            "automation_condition": None if node.automation_condition is None else str(node.automation_condition),
        }
    jobs = {}
    for job in repository.get_all_jobs():
        layer = job.asset_layer
        jobs[job.name] = {"assets": _keys(layer.selected_asset_keys),
                          "checks": _keys(layer.asset_graph.asset_check_keys),
                          "partitions": partitions_spec(job.partitions_def), "executor": job.executor_def.name,
                          "tags": dict(job.tags)}
    sensors = {sensor.name: {"jobs": sorted(target.job_name for target in sensor.targets),
                             "default_status": sensor.default_status.value,
                             "minimum_interval_seconds": sensor.minimum_interval_seconds}
               for sensor in repository.sensor_defs}
    schedules = {schedule.name: {"job": schedule.job_name, "cron": schedule.cron_schedule,
                                 "timezone": schedule.execution_timezone,
                                 "default_status": schedule.default_status.value}
                 for schedule in repository.schedule_defs}
    return {"assets": assets, "jobs": jobs, "sensors": sensors, "schedules": schedules}


def main() -> int:
    from groupmates_assets.definitions import defs

    json.dump(asset_specs(defs), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
