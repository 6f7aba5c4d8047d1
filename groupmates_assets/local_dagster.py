"""The instance's own services for a command-line session: the daemon and a loopback webserver whose GraphQL API
submits, follows and cancels backfills, as the UI does.

The daemon runs the work (backfills, the run queue, pools, run monitoring and run retries); the webserver is
only the door for the calls Dagster offers no public Python API for. Both load the code location from one code
server per location (``dagster code-server start``, as ``dagster dev`` and the compose deployment run it), which
also launches the runs: the daemon then never starts code servers of its own (it would start a fresh one on every
workspace reload, each minute, and one still importing the code when the services stop ends with a traceback).
Every service starts in a process session of its own, so a Ctrl-C in the terminal reaches the command (which
cancels cleanly) and not the runs directly, and all stop with the command.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKSPACE = REPO / "workspace.yaml"
TERMINAL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPTED = 130  # the exit status of a command ended by Ctrl-C or SIGTERM
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
CODE_SERVER_PREFIX = "code_server_"  # the service name (and log file) of each location's code server


def raise_interrupt(signum: int, _frame) -> None:
    """Ctrl-C and SIGTERM alike: a KeyboardInterrupt that names the signal, raised where the command is."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, raise_interrupt)


def ignore_stop_signals() -> None:
    """While a command cleans up after an interrupt: a second Ctrl-C must not cut it short."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class DagsterServiceError(RuntimeError):
    """A service did not start, or a GraphQL call was refused; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Webserver:
    """A Dagster webserver's GraphQL API at ``url``: the door to the calls Dagster offers no public Python API for.
    Any webserver will do: the one LocalDagster starts, or a deployment's (the compose stack's, on loopback)."""

    def __init__(self, url: str):
        self._url = url.rstrip("/")

    @property
    def url(self) -> str:
        return self._url

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

    def wait_until_loaded(self, timeout: float, alive: Callable[[], None] = lambda: None, logs: str = "") -> None:
        """Wait until the webserver answers and every code location is loaded; ``alive`` raises when what serves
        it has died. A location that fails to load is a DagsterServiceError with its message; ``logs`` says where
        to look when the webserver never got ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive()
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
        raise DagsterServiceError(f"the Dagster webserver was not ready after {timeout:.0f} s"
                                  + (f"; see {logs}" if logs else f" at {self.url}"))


class LocalDagster(Webserver):
    """A ``dagster code-server`` per code location, ``dagster-webserver`` and ``dagster-daemon run`` over them, on
    127.0.0.1, over the instance in ``DAGSTER_HOME``."""

    def __init__(self, home: str, env: dict[str, str] | None = None, workspace: Path = WORKSPACE,
                 port: int | None = None, paused_sensors: tuple[dict[str, str], ...] = (), host: str = "127.0.0.1"):
        self.home, self.workspace, self.paused_sensors, self.host = home, workspace, paused_sensors, host
        self._resume_sensors: list[dict[str, str]] = []
        self.port = port or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.env = {**os.environ, **(env or {}), "DAGSTER_HOME": home}
        self.log_dir = Path(home) / "service_logs"  # Dagster itself manages a "logs" folder here
        # the code servers, for the webserver and the daemon (theirs alone: another session may share the home)
        self.served_workspace = Path(home) / f"served_workspace.{os.getpid()}.{self.port}.yaml"
        self._processes: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """Where this process reaches the webserver (loopback when it listens on every address)."""
        host = "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host
        return f"http://{host}:{self.port}"

    def webserver_command(self) -> list[str]:
        return [os.path.join(os.path.dirname(sys.executable), "dagster-webserver"), "-w", str(self.served_workspace),
                "-h", self.host, "-p", str(self.port)]

    def code_locations(self) -> list[dict[str, str]]:
        """The ``python_module`` entries of the workspace file, with their working directories made absolute."""
        entries = (yaml.safe_load(self.workspace.read_text()) or {}).get("load_from") or []
        locations = []
        for entry in entries:
            module = entry.get("python_module") if isinstance(entry, dict) else None
            if not isinstance(module, dict) or "module_name" not in module:
                raise DagsterServiceError(f"{self.workspace}: every load_from entry must be a python_module with a "
                                          f"module_name, got {entry!r}")
            folder = (self.workspace.parent / module.get("working_directory", ".")).resolve()
            locations.append({"module_name": module["module_name"], "working_directory": str(folder),
                              "location_name": module.get("location_name", module["module_name"])})
        return locations

    def __enter__(self) -> LocalDagster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 300) -> None:
        """Start a code server per location and wait until each serves, then the webserver over them; wait until
        it has loaded the code location, pause ``paused_sensors`` (before the daemon could tick them), then start
        the daemon over the same code servers."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        bin_dir = os.path.dirname(sys.executable)
        deadline = time.monotonic() + timeout
        served = []
        for location in self.code_locations():
            port = free_port()
            name = f"{CODE_SERVER_PREFIX}{location['location_name']}"
            self._spawn(name, [os.path.join(bin_dir, "dagster"), "code-server", "start", "-h", "127.0.0.1",
                               "-p", str(port), "-m", location["module_name"], "-d", location["working_directory"],
                               "--location-name", location["location_name"]])
            served.append({"grpc_server": {"host": "127.0.0.1", "port": port,
                                           "location_name": location["location_name"]}})
            self._wait_listening(name, port, deadline)
        self.served_workspace.write_text(yaml.safe_dump({"load_from": served}))
        self._spawn("webserver", self.webserver_command())
        self._wait_ready(max(1.0, deadline - time.monotonic()))
        for selector in self.paused_sensors:
            if set_sensor_running(self, selector, False):
                self._resume_sensors.append(selector)
        self._spawn("daemon", [os.path.join(bin_dir, "dagster-daemon"), "run", "-w", str(self.served_workspace)])

    def _wait_listening(self, name: str, port: int, deadline: float) -> None:
        """A code server listens once it has loaded its code (a load error is then served to the webserver)."""
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(0.2)
        raise DagsterServiceError(f"the {name.replace('_', ' ')} did not listen on 127.0.0.1:{port} in time; see "
                                  f"{self.log_dir / (name + '.log')}")

    def service_processes(self) -> dict[str, list[str]]:
        """Each service's processes (its process group) by command line: what a test reads to see who runs what."""
        groups: dict[int, list[str]] = {process.pid: [] for process in self._processes.values()}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                group = int(stat.read_text().rsplit(")", 1)[1].split()[2])
                if group in groups:
                    groups[group].append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        return {name: groups[process.pid] for name, process in self._processes.items()}

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it until it exits
        self._processes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                                 cwd=self.workspace.parent)
        log.close()

    def wait(self, poll: float = 0.5) -> tuple[str, int]:
        """Block until a service exits (it should not): its name and exit code."""
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    return name, process.returncode
            time.sleep(poll)

    def _wait_ready(self, timeout: float) -> None:
        self.wait_until_loaded(timeout, alive=self._check_alive, logs=str(self.log_dir))

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                raise DagsterServiceError(f"the Dagster {name} exited with code {process.returncode}; see "
                                          f"{self.log_dir / (name + '.log')}")

    def stop(self, grace: float = 20) -> None:
        """Resume the sensors it paused; SIGTERM the webserver and the daemon and let them end, then the code servers
        (which shut down their code processes, and those let their run processes end), so that no service is left
        calling a code server that has gone; after ``grace`` seconds in all, SIGKILL each service's process group:
        whatever is left of it (code processes, runs) ends at once and silently, never half-way through a shutdown
        that a signal interrupted (the callers' groups before the code servers are signalled)."""
        for selector in self._resume_sensors:
            with contextlib.suppress(DagsterServiceError, OSError):
                set_sensor_running(self, selector, True)
        self._resume_sensors.clear()
        deadline = time.monotonic() + grace
        callers = {n: p for n, p in self._processes.items() if not n.startswith(CODE_SERVER_PREFIX)}
        servers = {n: p for n, p in self._processes.items() if n.startswith(CODE_SERVER_PREFIX)}
        for group, at_least in ((callers, 0.1), (servers, min(grace, 1.0))):
            for process in group.values():
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            until = max(deadline, time.monotonic() + at_least)
            for process in group.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(max(0.1, until - time.monotonic()))
                while _group_alive(process.pid) and time.monotonic() < until:
                    time.sleep(0.1)  # its children ending after it
            for process in group.values():
                _signal_group(process, signal.SIGKILL)
                process.wait()
        self._processes.clear()
        self.served_workspace.unlink(missing_ok=True)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# -- backfills through GraphQL, the calls the UI makes ----------------------------------------------------------
def _result(data: dict[str, Any], field: str, ok: str) -> dict[str, Any]:
    result = data[field]
    if result["__typename"] != ok:
        raise DagsterServiceError(f"{field}: {result.get('message') or result['__typename']}")
    return result


def asset_nodes(dagster: Webserver) -> list[dict[str, Any]]:
    """Every asset of the workspace: key, group, upstream keys and whether it is partitioned."""
    data = dagster.graphql("""{ assetNodes { assetKey { path } groupName isPartitioned
        dependencyKeys { path } } }""")
    return [{"key": "/".join(n["assetKey"]["path"]), "group": n["groupName"], "partitioned": n["isPartitioned"],
             "upstream": ["/".join(d["path"]) for d in n["dependencyKeys"]]} for n in data["assetNodes"]]


def launch_backfill(dagster: Webserver, assets: list[str], title: str, tags: dict[str, str]) -> str:
    """One asset backfill of every partition of ``assets`` (the UI's "Materialize all"); its id."""
    params = {"assetSelection": [{"path": key.split("/")} for key in assets], "allPartitions": True,
              "title": title, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
    data = dagster.graphql("""mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
        __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
        ... on InvalidSubsetError { message } ... on PartitionSetNotFoundError { message }
        ... on UnauthorizedError { message } } }""", {"p": params})
    return _result(data, "launchPartitionBackfill", "LaunchBackfillSuccess")["backfillId"]


def resume_backfill(dagster: Webserver, backfill_id: str) -> str:
    """Re-execute a finished backfill from failure: a new backfill of what it did not materialize."""
    data = dagster.graphql("""mutation($p: ReexecutionParams) { reexecutePartitionBackfill(reexecutionParams: $p) {
        __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
        ... on UnauthorizedError { message } } }""",
                           {"p": {"parentRunId": backfill_id, "strategy": "FROM_FAILURE"}})
    return _result(data, "reexecutePartitionBackfill", "LaunchBackfillSuccess")["backfillId"]


def cancel_backfill(dagster: Webserver, backfill_id: str) -> None:
    data = dagster.graphql("""mutation($id: String!) { cancelPartitionBackfill(backfillId: $id) {
        __typename ... on CancelBackfillSuccess { backfillId } ... on PythonError { message }
        ... on UnauthorizedError { message } } }""", {"id": backfill_id})
    _result(data, "cancelPartitionBackfill", "CancelBackfillSuccess")


def terminate_runs(dagster: Webserver, run_ids: list[str]) -> None:
    """Ask the runs' processes to stop (the UI's Terminate): they end as CANCELED, their pool slots freed."""
    if run_ids:
        dagster.graphql("""mutation($ids: [String!]!) { terminateRuns(runIds: $ids) { __typename } }""",
                        {"ids": run_ids})


def backfill_state(dagster: Webserver, backfill_id: str) -> dict[str, Any]:
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


def recent_backfills(dagster: Webserver, limit: int = 50) -> list[dict[str, Any]]:
    """The newest backfills first: id, status and tags."""
    data = dagster.graphql("""query($limit: Int) { partitionBackfillsOrError(limit: $limit) { __typename
        ... on PartitionBackfills { results { id status timestamp tags { key value } } }
        ... on PythonError { message } } }""", {"limit": limit})
    results = _result(data, "partitionBackfillsOrError", "PartitionBackfills")["results"]
    return [{"id": b["id"], "status": b["status"], "timestamp": b["timestamp"],
             "tags": {t["key"]: t["value"] for t in b["tags"]}} for b in results]


def set_pool_limit(dagster: Webserver, pool: str, limit: int) -> None:
    """How many steps of ``pool`` may run at once on this instance (the UI's pool settings)."""
    dagster.graphql("""mutation($key: String!, $limit: Int!) { setConcurrencyLimit(concurrencyKey: $key,
        limit: $limit) }""", {"key": pool, "limit": limit})


def sensor_selector(name: str, location: str = "groupmates_assets") -> dict[str, str]:
    return {"repositoryName": "__repository__", "repositoryLocationName": location, "sensorName": name}


def set_sensor_running(dagster: Webserver, selector: dict[str, str], running: bool) -> bool:
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


def backfill_runs(dagster: Webserver, backfill_id: str) -> list[dict[str, Any]]:
    """Every run of a backfill (the runs tagged with its id, retries and re-executions included): id, status,
    tags, asset keys, start and end time (epoch seconds, None before they happen)."""
    data = dagster.graphql("""query($tags: [ExecutionTag!]) { runsOrError(filter: {tags: $tags}) { __typename
        ... on Runs { results { runId status startTime endTime tags { key value } assetSelection { path } } }
        ... on PythonError { message } ... on InvalidPipelineRunsFilterError { message } } }""",
                           {"tags": [{"key": "dagster/backfill", "value": backfill_id}]})
    runs = _result(data, "runsOrError", "Runs")["results"]
    return [{"id": r["runId"], "status": r["status"], "start": r["startTime"], "end": r["endTime"],
             "tags": {t["key"]: t["value"] for t in r["tags"]},
             "assets": sorted("/".join(a["path"]) for a in r["assetSelection"] or [])} for r in runs]


def dynamic_partitions(dagster: Webserver, asset: str) -> list[str]:
    """The partition keys of an asset (for a dynamic partitions definition: the keys registered so far)."""
    data = dagster.graphql("""query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename
        ... on AssetNode { partitionKeys } ... on AssetNotFoundError { message } } }""",
                           {"key": {"path": asset.split("/")}})
    return _result(data, "assetNodeOrError", "AssetNode")["partitionKeys"]
