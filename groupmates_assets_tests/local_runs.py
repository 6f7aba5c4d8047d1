"""Runs the crash tests execute in their own processes with ``execute_in_process`` (no daemon watches them).

Each is tagged with the host and the PID that runs it, so that the next step after a SIGKILL can tell which runs
died: it marks them failed and gives back the pool slots they held; otherwise a killed run's ``gpu`` slot stays
claimed and every later GPU step waits for it. Runs launched by the daemon need none of this: its run monitoring
does the same.
"""

import os
import socket

import dagster as dg

from groupmates_assets.defs.deployment import GPU_POOL
from groupmates_assets.lib.storage import pid_alive

PID_TAG = "groupmates/pid"
HOST_TAG = "groupmates/host"
_LIVE_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.NOT_STARTED,
                  dg.DagsterRunStatus.CANCELING]


def local_run_tags() -> dict[str, str]:
    """Tags for a run executed in this process."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def release_dead_local_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed every unfinished run of this host whose process is gone, and free its pool slots; returns
    their run ids."""
    released = []
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=_LIVE_STATUSES,
                                                   tags={HOST_TAG: socket.gethostname()}))
    for run in runs:
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        instance.report_run_failed(run, f"its process (PID {pid}) ended without finishing the run: killed or "
                                   "crashed; the run's pool slots were given back")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
    return released


def set_gpu_pool_slots(instance: dg.DagsterInstance, slots: int) -> None:
    """How many steps of the ``gpu`` pool may run at once on this instance."""
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, max(1, slots))
