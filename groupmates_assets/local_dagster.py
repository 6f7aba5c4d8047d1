"""The instance's own services for a command-line session: the daemon and a loopback webserver whose GraphQL API
submits, follows and cancels backfills, as the UI does.

The daemon runs the work (backfills, the run queue, pools, run monitoring and run retries); the webserver is
only the door for the calls Dagster offers no public Python API for. Both start in a process session of their
own, so a Ctrl-C in the terminal reaches the command (which cancels cleanly) and not the runs directly, and both
stop with the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKSPACE = REPO / "workspace.yaml"
TERMINAL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}


class DagsterServiceError(RuntimeError):
    """A service did not start, or a GraphQL call was refused; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalDagster:
    """``dagster-daemon run`` and ``dagster-webserver`` on 127.0.0.1 over the instance in ``DAGSTER_HOME``."""

    def __init__(self, home: str, env: dict[str, str] | None = None, workspace: Path = WORKSPACE,
                 port: int | None = None, paused_sensors: tuple[dict[str, str], ...] = ()):
        self.home, self.workspace, self.paused_sensors = home, workspace, paused_sensors
        self._resume_sensors: list[dict[str, str]] = []
        self.port = port or free_port()
        self.env = {**os.environ, **(env or {}), "DAGSTER_HOME": home}
        self.log_dir = Path(home) / "service_logs"  # Dagster itself manages a "logs" folder here
        self._processes: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalDagster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 300) -> None:
        """Start the webserver, wait until it has loaded the code location, pause ``paused_sensors`` (before the
        daemon could tick them), then start the daemon."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        bin_dir = os.path.dirname(sys.executable)
        self._spawn("webserver", [os.path.join(bin_dir, "dagster-webserver"), "-w", str(self.workspace),
                                  "-h", "127.0.0.1", "-p", str(self.port)])
        self._wait_ready(timeout)
        for selector in self.paused_sensors:
            if set_sensor_running(self, selector, False):
                self._resume_sensors.append(selector)
        self._spawn("daemon", [os.path.join(bin_dir, "dagster-daemon"), "run", "-w", str(self.workspace)])

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it until it exits
        self._processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                                 cwd=self.workspace.parent)
        log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise DagsterServiceError(f"the Dagster {name} exited with code {process.returncode}; see "
                                              f"{self.log_dir / (name + '.log')}")
            try:
                problem = self.location_problem()
            except (urllib.error.URLError, ConnectionError, TimeoutError, DagsterServiceError):
                time.sleep(1)
                continue
            if problem is None:
                return
            if problem != "loading":
                raise DagsterServiceError(f"the code location failed to load: {problem}")
            time.sleep(1)
        raise DagsterServiceError(f"the Dagster webserver was not ready after {timeout:.0f} s; see {self.log_dir}")

    def location_problem(self) -> str | None:
        """None when every code location is loaded, "loading" while one loads, else its error message."""
        data = self.graphql("""{ workspaceOrError { __typename ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
        entries = data["workspaceOrError"].get("locationEntries", [])
        if not entries or any(e["loadStatus"] == "LOADING" for e in entries):
            return "loading"
        errors = [f"{e['name']}: {e['locationOrLoadError']['message'].strip()}" for e in entries
                  if (e.get("locationOrLoadError") or {}).get("__typename") == "PythonError"]
        return "; ".join(errors) or None

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        """POST a GraphQL document to the webserver; its ``data``, or a DagsterServiceError with the errors."""
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise DagsterServiceError("; ".join(e.get("message", str(e)) for e in payload["errors"]))
        return payload["data"]

    def stop(self, grace: float = 20) -> None:
        """Resume the sensors it paused, then SIGTERM each service's process group (its code servers and any run
        still there), then SIGKILL."""
        for selector in self._resume_sensors:
            with contextlib.suppress(DagsterServiceError, OSError):
                set_sensor_running(self, selector, True)
        self._resume_sensors.clear()
        for process in self._processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self._processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(process, signal.SIGKILL)
            process.wait()
        self._processes.clear()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


# -- backfills through GraphQL, the calls the UI makes ----------------------------------------------------------
def _result(data: dict[str, Any], field: str, ok: str) -> dict[str, Any]:
    result = data[field]
    if result["__typename"] != ok:
        raise DagsterServiceError(f"{field}: {result.get('message') or result['__typename']}")
    return result


def asset_nodes(dagster: LocalDagster) -> list[dict[str, Any]]:
    """Every asset of the workspace: key, group, upstream keys and whether it is partitioned."""
    data = dagster.graphql("""{ assetNodes { assetKey { path } groupName isPartitioned
        dependencyKeys { path } } }""")
    return [{"key": "/".join(n["assetKey"]["path"]), "group": n["groupName"], "partitioned": n["isPartitioned"],
             "upstream": ["/".join(d["path"]) for d in n["dependencyKeys"]]} for n in data["assetNodes"]]


def launch_backfill(dagster: LocalDagster, assets: list[str], title: str, tags: dict[str, str]) -> str:
    """One asset backfill of every partition of ``assets`` (the UI's "Materialize all"); its id."""
    params = {"assetSelection": [{"path": key.split("/")} for key in assets], "allPartitions": True,
              "title": title, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
    data = dagster.graphql("""mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
        __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
        ... on InvalidSubsetError { message } ... on PartitionSetNotFoundError { message }
        ... on UnauthorizedError { message } } }""", {"p": params})
    return _result(data, "launchPartitionBackfill", "LaunchBackfillSuccess")["backfillId"]


def resume_backfill(dagster: LocalDagster, backfill_id: str) -> str:
    """Re-execute a finished backfill from failure: a new backfill of what it did not materialize."""
    data = dagster.graphql("""mutation($p: ReexecutionParams) { reexecutePartitionBackfill(reexecutionParams: $p) {
        __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
        ... on UnauthorizedError { message } } }""",
                           {"p": {"parentRunId": backfill_id, "strategy": "FROM_FAILURE"}})
    return _result(data, "reexecutePartitionBackfill", "LaunchBackfillSuccess")["backfillId"]


def cancel_backfill(dagster: LocalDagster, backfill_id: str) -> None:
    data = dagster.graphql("""mutation($id: String!) { cancelPartitionBackfill(backfillId: $id) {
        __typename ... on CancelBackfillSuccess { backfillId } ... on PythonError { message }
        ... on UnauthorizedError { message } } }""", {"id": backfill_id})
    _result(data, "cancelPartitionBackfill", "CancelBackfillSuccess")


def terminate_runs(dagster: LocalDagster, run_ids: list[str]) -> None:
    """Ask the runs' processes to stop (the UI's Terminate): they end as CANCELED, their pool slots freed."""
    if run_ids:
        dagster.graphql("""mutation($ids: [String!]!) { terminateRuns(runIds: $ids) { __typename } }""",
                        {"ids": run_ids})


def backfill_state(dagster: LocalDagster, backfill_id: str) -> dict[str, Any]:
    """The backfill's status, tags and, per asset, partitions targeted, materialized, failed and in progress."""
    data = dagster.graphql("""query($id: String!) { partitionBackfillOrError(backfillId: $id) {
        __typename ... on PartitionBackfill { id status title tags { key value } assetBackfillData {
          assetBackfillStatuses {
            __typename
            ... on AssetPartitionsStatusCounts { assetKey { path } numPartitionsTargeted
                numPartitionsInProgress numPartitionsMaterialized numPartitionsFailed }
            ... on UnpartitionedAssetStatus { assetKey { path } inProgress materialized failed } } } }
        ... on PythonError { message } ... on BackfillNotFoundError { message } } }""", {"id": backfill_id})
    backfill = _result(data, "partitionBackfillOrError", "PartitionBackfill")
    assets = {}
    for status in (backfill.get("assetBackfillData") or {}).get("assetBackfillStatuses", []):
        key = "/".join(status["assetKey"]["path"])
        if status["__typename"] == "UnpartitionedAssetStatus":
            assets[key] = {"targeted": 1, "materialized": int(status["materialized"]),
                           "failed": int(status["failed"]), "in_progress": int(status["inProgress"])}
        else:
            assets[key] = {"targeted": status["numPartitionsTargeted"],
                           "materialized": status["numPartitionsMaterialized"],
                           "failed": status["numPartitionsFailed"], "in_progress": status["numPartitionsInProgress"]}
    return {"id": backfill["id"], "status": backfill["status"], "title": backfill["title"],
            "tags": {t["key"]: t["value"] for t in backfill["tags"]}, "assets": assets}


def recent_backfills(dagster: LocalDagster, limit: int = 50) -> list[dict[str, Any]]:
    """The newest backfills first: id, status and tags."""
    data = dagster.graphql("""query($limit: Int) { partitionBackfillsOrError(limit: $limit) { __typename
        ... on PartitionBackfills { results { id status timestamp tags { key value } } }
        ... on PythonError { message } } }""", {"limit": limit})
    results = _result(data, "partitionBackfillsOrError", "PartitionBackfills")["results"]
    return [{"id": b["id"], "status": b["status"], "timestamp": b["timestamp"],
             "tags": {t["key"]: t["value"] for t in b["tags"]}} for b in results]


def set_pool_limit(dagster: LocalDagster, pool: str, limit: int) -> None:
    """How many steps of ``pool`` may run at once on this instance (the UI's pool settings)."""
    dagster.graphql("""mutation($key: String!, $limit: Int!) { setConcurrencyLimit(concurrencyKey: $key,
        limit: $limit) }""", {"key": pool, "limit": limit})


def sensor_selector(name: str, location: str = "groupmates_assets") -> dict[str, str]:
    return {"repositoryName": "__repository__", "repositoryLocationName": location, "sensorName": name}


def set_sensor_running(dagster: LocalDagster, selector: dict[str, str], running: bool) -> bool:
    """Start or stop a sensor (the UI's toggle); whether it was running before."""
    data = dagster.graphql("""query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename
        ... on Sensor { id sensorState { status } } ... on PythonError { message }
        ... on SensorNotFoundError { message } } }""", {"s": selector})
    sensor = _result(data, "sensorOrError", "Sensor")
    was_running = sensor["sensorState"]["status"] == "RUNNING"
    if running and not was_running:
        data = dagster.graphql("""mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename
            ... on PythonError { message } ... on UnauthorizedError { message } } }""", {"s": selector})
        _result(data, "startSensor", "Sensor")
    elif was_running and not running:
        data = dagster.graphql("""mutation($id: String) { stopSensor(id: $id) { __typename
            ... on PythonError { message } ... on UnauthorizedError { message } } }""", {"id": sensor["id"]})
        _result(data, "stopSensor", "StopSensorMutationResult")
    return was_running
