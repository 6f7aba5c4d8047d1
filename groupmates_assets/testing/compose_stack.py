"""The compose deployment (docker/docker-compose.yaml) as a user starts it, for the deployment test and benchmark:
images built with scripts/build_images.sh, the stack started with podman-compose under a project name of its own,
and torn down, volumes and run containers included.

Podman runs with the project's docker/containers.conf (CONTAINERS_CONF; nothing under /etc changes). The daemon's
DockerRunLauncher reaches the engine through the Docker-compatible API that ``podman system service`` serves on a
socket in the stack's work folder, mounted into the daemon and webserver containers. Only the webserver is
published, on a free port of 127.0.0.1; everything else stays on the stack's own network.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from groupmates_assets import local_dagster as services
from groupmates_assets.local_dagster import Webserver, free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker" / "docker-compose.yaml"
CONTAINERS_CONF = REPO / "docker" / "containers.conf"
BUILD_SCRIPT = REPO / "scripts" / "build_images.sh"
SERVICES = ("postgres", "s3", "code-location", "webserver", "daemon")
TOOLS = ("podman", "podman-compose", "debootstrap", "runc")
RUNS_AT_ONCE = 2  # CPU steps sharing the machine, as the local demo runs them (its dagster.yaml: max_concurrent_runs)


class StackError(RuntimeError):
    """A step of the stack failed; the message says which, with the command's output."""


def missing_tools() -> list[str]:
    """The programs the stack needs that are not installed (scripts/deploy_tools.sh installs them)."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


@dataclass
class ComposeStack:
    """One compose project: its name, secrets, loopback UI port and network are its own."""

    work: Path
    profile: str = "ci"
    project: str = field(default_factory=lambda: f"gmdeploy{secrets.token_hex(3)}")
    ui_port: int = field(default_factory=free_port)
    timings: dict[str, float] = field(default_factory=dict)
    _engine_api: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.socket = self.work / "engine.sock"
        self.database = {"user": "dagster", "password": secrets.token_hex(16), "db": "dagster"}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "GROUPMATES_", "AWS_"))}
        self.env = {**base, "CONTAINERS_CONF": str(CONTAINERS_CONF),
                    "DAGSTER_PG_USERNAME": self.database["user"], "DAGSTER_PG_PASSWORD": self.database["password"],
                    "DAGSTER_PG_DB": self.database["db"], "GROUPMATES_S3_ACCESS_KEY": secrets.token_hex(10),
                    "GROUPMATES_S3_SECRET_KEY": secrets.token_hex(20), "GROUPMATES_S3_BUCKET": "groupmates",
                    "GROUPMATES_PROFILE": self.profile, "GROUPMATES_POOL_DIR": "",
                    "GROUPMATES_UI_PORT": str(self.ui_port), "GROUPMATES_NETWORK": self.project,
                    "GROUPMATES_CONTAINER_SOCKET": str(self.socket), "GROUPMATES_CONTAINER_SOCKET_GID": "0",
                    # As `groupmates demo` on a CPU machine: each of two runs at once gets its share of the cores.
                    "GROUPMATES_TORCH_THREADS": str(max(1, (os.cpu_count() or 1) // RUNS_AT_ONCE))}

    # --- commands ----------------------------------------------------------------------------------------------
    def _run(self, command: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise StackError(f"`{' '.join(command)}` exited with {done.returncode}:\n{done.stdout[-4000:]}\n"
                             f"{done.stderr[-4000:]}")
        return done

    def podman(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return self._run(["podman", *args], timeout=timeout, check=check)

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """podman-compose on a copy of docker/docker-compose.yaml in the work folder: podman-compose 1.0.3 lets a
        docker/.env beside the file override the environment, and a developer's own must not leak in."""
        compose_file = self.work / COMPOSE_FILE.name
        shutil.copyfile(COMPOSE_FILE, compose_file)
        return self._run(["podman-compose", "-p", self.project, "-f", str(compose_file), *args], timeout=timeout)

    def _timed(self, name: str, started: float) -> float:
        self.timings[name] = round(time.monotonic() - started, 1)
        return self.timings[name]

    # --- life cycle --------------------------------------------------------------------------------------------
    def build(self, timeout: float = 3000) -> str:
        """scripts/build_images.sh (every image, cached layers reused); its log."""
        started = time.monotonic()
        done = self._run(["bash", str(BUILD_SCRIPT)], timeout=timeout)
        self._timed("build_s", started)
        return done.stdout + done.stderr

    def start_engine_api(self, timeout: float = 30) -> None:
        """The Docker-compatible API of podman on the stack's socket, for the run launcher in the daemon and
        webserver containers. podman-compose 1.0.3 ignores `group_add`, so the socket is open to every user: only
        the containers it is mounted into reach it, since the work folder is root's alone (0700)."""
        self._engine_api = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"], env=self.env,
            stdout=open(self.work / "engine-api.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self._engine_api.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"podman system service did not start: {(self.work / 'engine-api.log').read_text()}")
            time.sleep(0.2)
        os.chmod(self.work, 0o700)
        os.chmod(self.socket, 0o666)

    def up(self, timeout: float = 600) -> float:
        """`podman-compose up -d`, then wait until every service's health check passes; seconds to healthy."""
        started = time.monotonic()
        self.compose("up", "-d", timeout=timeout)
        self.wait_healthy(SERVICES, timeout=timeout)
        return self._timed("up_to_healthy_s", started)

    def wait_healthy(self, services: tuple[str, ...], timeout: float = 600) -> None:
        """Run each service's health check (podman runs them on a timer only under systemd) until all pass."""
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            pending = [s for s in pending if self.podman("healthcheck", "run", self.container(s),
                                                         check=False).returncode != 0]
            if pending and time.monotonic() > deadline:
                raise StackError(f"not healthy after {timeout:.0f} s: {pending}\n" + self.logs(*pending))
            if pending:
                time.sleep(2)

    def down(self) -> float:
        """`podman-compose down -v` (containers, network, volumes), then the run containers left behind and the
        engine API; seconds `down` took."""
        started = time.monotonic()
        with contextlib.suppress(StackError, subprocess.TimeoutExpired):
            self.compose("down", "-v", timeout=300)
        seconds = self._timed("down_s", started)
        for container in self.run_containers(every=True):
            self.podman("rm", "-f", container, check=False)
        self.podman("network", "rm", "-f", self.project, check=False)
        for volume in ("postgres-data", "s3-data"):
            self.podman("volume", "rm", "-f", f"{self.project}_{volume}", check=False)
        if self._engine_api is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._engine_api.pid, signal.SIGTERM)
            try:
                self._engine_api.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._engine_api.pid, signal.SIGKILL)
                self._engine_api.wait()
        return seconds

    # --- containers --------------------------------------------------------------------------------------------
    def container(self, service: str) -> str:
        """The container of a service (podman-compose names it <project>_<service>_1)."""
        return f"{self.project}_{service}_1"

    def run_containers(self, every: bool = False) -> list[str]:
        """The containers the run launcher started on the stack's network (running ones, or every one)."""
        names = self.podman("ps", *(["-a"] if every else []), "--filter", f"network={self.project}", "--format",
                            "{{.Names}}", check=False).stdout.split()
        services = {self.container(s) for s in SERVICES}
        return [name for name in names if name not in services]

    def state(self, service: str) -> dict:
        (info,) = json.loads(self.podman("inspect", self.container(service)).stdout)
        return info["State"]

    def kill(self, *containers: str) -> None:
        self.podman("kill", "--signal", "KILL", *containers)

    def kill_run_containers(self) -> set[str]:
        """SIGKILL to every running run container; the full ids of those it killed (one that ended, or was
        removed, between the listing and the kill is not among them). The run launcher tags each run with its
        container's full id (docker/container_id)."""
        services = {self.container(s) for s in SERVICES}
        listed = self.podman("ps", "--no-trunc", "--filter", f"network={self.project}", "--format",
                             "{{.ID}} {{.Names}}", check=False).stdout.split("\n")
        ids = [line.split()[0] for line in listed if line.strip() and line.split()[1] not in services]
        if not ids:
            return set()
        done = self.podman("kill", "--signal", "KILL", *ids, check=False)
        return set(done.stdout.split()) & set(ids)

    def start(self, *services: str) -> None:
        """Start services whose container is not running (the restart policy may have done it already)."""
        stopped = [s for s in services if not self.state(s).get("Running")]
        if stopped:
            self.podman("start", *(self.container(s) for s in stopped))

    def exec(self, service: str, *command: str, timeout: float = 300) -> str:
        return self.podman("exec", self.container(service), *command, timeout=timeout).stdout

    def logs(self, *services: str, tail: int = 60) -> str:
        return "\n".join(f"--- {s}\n" + self.podman("logs", "--tail", str(tail), self.container(s),
                                                    check=False).stdout for s in services)

    def psql(self, sql: str) -> list[list[str]]:
        """Rows of a query on the instance's database, run by psql inside the postgres container."""
        out = self.exec("postgres", "psql", "-X", "-q", "-A", "-t", "-F", "\t", "-U", self.database["user"],
                        "-d", self.database["db"], "-c", sql)
        return [line.split("\t") for line in out.splitlines() if line]

    def webserver(self) -> Webserver:
        return Webserver(f"http://127.0.0.1:{self.ui_port}")


# --- the whole graph through a webserver, as the UI's "Materialize all" -------------------------------------------
POOL_SOURCE, DISCOVERY_SENSOR, POOL_SHARDS = "embedded_pool", "pool_shard_sensor", 16
IN_PROGRESS = {"REQUESTED", "CANCELING", "FAILING"}


def wait_backfill(ui: Webserver, backfill_id: str, timeout: float, on_poll=None, poll: float = 5) -> dict:
    """Poll the backfill until it is no longer in progress (``on_poll(state)`` after each look); its last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = services.backfill_state(ui, backfill_id)
        if state["status"] not in IN_PROGRESS:
            return state
        if on_poll is not None:
            on_poll(state)
        if time.monotonic() > deadline:
            raise StackError(f"backfill {backfill_id} still {state['status']} after {timeout:.0f} s: "
                             f"{state['assets']}")
        time.sleep(poll)


def register_embedded_pool(ui: Webserver, timeout: float = 900) -> list[str]:
    """The embedded pool built by a backfill of its asset, then its shards registered by the deployment's own
    discovery sensor (it runs by default, once a minute); the sensor is then stopped, as `groupmates demo` does,
    so that it does not request filter runs of the shards beside the whole graph's backfill. The shard keys."""
    backfill_id = services.launch_backfill(ui, [POOL_SOURCE], "embedded pool", {})
    state = wait_backfill(ui, backfill_id, timeout)
    if state["status"] != "COMPLETED_SUCCESS":
        raise StackError(f"the embedded pool's backfill ended {state['status']}: {state['assets']}")
    deadline = time.monotonic() + 300
    while len(keys := services.dynamic_partitions(ui, "pool_shard")) < POOL_SHARDS:
        if time.monotonic() > deadline:
            raise StackError(f"the sensor registered {len(keys)} of {POOL_SHARDS} shards in 300 s")
        time.sleep(5)
    services.set_sensor_running(ui, services.sensor_selector(DISCOVERY_SENSOR), False)
    return keys


def whole_graph(ui: Webserver) -> list[str]:
    """Every asset of the workspace but the pool source: what the demo's main backfill covers."""
    return sorted(n["key"] for n in services.asset_nodes(ui) if n["key"] != POOL_SOURCE)
