"""Run one job of the project (one partition, optionally only some of its assets) in a process of its own, as the
crash tests need: they kill this process at a failpoint (``groupmates_assets.lib.failpoints``) and rerun it.

    python -m groupmates_assets_tests.crash_child JOB [PARTITION] [ASSET ...]

The instance comes from DAGSTER_HOME, the platform from the GROUPMATES_* variables. It first marks failed the runs
whose process died (a killed predecessor) and frees their pool slots. Exit status 0 when the run succeeded, 1 when
it failed (its error on stderr).
"""

import sys

import dagster as dg

from groupmates_assets.definitions import build_definitions
from groupmates_assets_tests.local_runs import local_run_tags, release_dead_local_runs


def main(argv: list[str]) -> int:
    job_name, partition, assets = argv[0], (argv[1] or None) if len(argv) > 1 else None, argv[2:]
    instance = dg.DagsterInstance.get()
    for run_id in release_dead_local_runs(instance):
        print(f"released dead run {run_id}", file=sys.stderr)
    job = build_definitions().resolve_job_def(job_name)
    result = job.execute_in_process(instance=instance, partition_key=partition, tags=local_run_tags(),
                                    asset_selection=[dg.AssetKey(a) for a in assets] or None, raise_on_error=False)
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
                print(event.step_failure_data.error.to_string(), file=sys.stderr)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
