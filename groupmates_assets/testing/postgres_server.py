"""A throwaway PostgreSQL server on loopback, for the tests and benchmarks that need Dagster on PostgreSQL storage.

Debian's postgresql binaries (scripts/install_test_services.sh) run a fresh cluster (initdb) at a free port on
127.0.0.1 with a random password; it is always stopped and deleted afterwards. Without the binaries
`postgres_server()` raises `PostgresUnavailable` and `unavailable_reason()` says why (the tests' `postgres` fixture
skips with it).

The instance helpers build a Dagster home from the compose deployment's docker/dagster.yaml (PostgreSQL storage,
queued runs, pools, run monitoring), with compute logs kept on local disk instead of its S3 bucket; they read
docker/ from the source checkout (an editable install, as `make setup` makes).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_INSTANCE = REPO / "docker" / "dagster.yaml"
MISSING_BINARIES = ("PostgreSQL server binaries (initdb, postgres) not found: install Debian's postgresql package "
                    "(scripts/install_test_services.sh, run by `make setup`)")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here (the message says why)."""


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname, connect_timeout=2)

    def instance_env(self, database: str) -> dict[str, str]:
        """The variables docker/dagster.yaml reads its PostgreSQL storage from, pointing at ``database`` here."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USERNAME": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": database}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """Where initdb and postgres are: on PATH, else Debian's /usr/lib/postgresql/<newest version>/bin."""
    on_path = shutil.which("initdb")
    if on_path and (Path(on_path).resolve().parent / "postgres").exists():
        return Path(on_path).resolve().parent
    versions = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if (p.parent / "postgres").exists()]
    return max(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def unprivileged_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as `postgres` (Debian's package creates it) or nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root with neither a postgres nor a nobody user to run PostgreSQL as")


def unavailable_reason() -> str | None:
    """Why no server can be started here, or None when one can."""
    if postgres_bin_dir() is None:
        return MISSING_BINARIES
    try:
        unprivileged_user()
    except PostgresUnavailable as error:
        return str(error)
    return None


@contextlib.contextmanager
def postgres_server(max_connections: int = 100) -> Iterator[Postgres]:
    """A throwaway cluster on 127.0.0.1 at a free port with a random password; always stopped and deleted."""
    reason = unavailable_reason()
    if reason:
        raise PostgresUnavailable(reason)
    bin_dir = postgres_bin_dir()
    assert bin_dir is not None
    user = unprivileged_user()
    as_user: dict[str, Any] = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    # Under the system temp dir: pytest's own temp dirs are private to the user running the tests.
    workdir = Path(tempfile.mkdtemp(prefix="gm-pg-"))
    server = Postgres("127.0.0.1", free_port(), "dagster", secrets.token_hex(16))
    process: subprocess.Popen | None = None
    try:
        (workdir / "pwfile").write_text(server.password + "\n")
        if user:
            for path in (workdir, workdir / "pwfile"):
                os.chown(path, user.pw_uid, user.pw_gid)
        subprocess.run([str(bin_dir / "initdb"), "-D", str(workdir / "data"), "-U", server.user,
                        f"--pwfile={workdir / 'pwfile'}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
                        "--no-sync"], check=True, capture_output=True, timeout=120, env=env, **as_user)
        with open(workdir / "postgres.log", "wb") as log:
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(workdir / "data"), "-h", server.host, "-p", str(server.port),
                 "-k", str(workdir), "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
                 "-c", f"max_connections={max_connections}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                **as_user)
        deadline = time.monotonic() + 60
        while True:
            try:
                server.connect().close()
                break
            except Exception as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start:\n{(workdir / 'postgres.log').read_text()[-3000:]}"
                                       ) from error
                time.sleep(0.2)
        yield server
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # fast shutdown: roll back open transactions, close connections
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def create_database(server: Postgres, name: str) -> None:
    connection = server.connect()
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


def write_compose_instance_home(home: Path) -> Path:
    """``home`` as a DAGSTER_HOME holding docker/dagster.yaml, compute logs on local disk instead of S3 and runs
    launched in this machine's processes (Dagster's default launcher) instead of containers, so run monitoring
    fails a run whose worker died rather than resuming it (resuming needs the container launcher).

    Everything else (PostgreSQL storage read from DAGSTER_PG_*, the run queue, pools, run monitoring) is the
    compose deployment's own; open it with the variables of `Postgres.instance_env` in the environment.
    """
    config = yaml.safe_load(COMPOSE_INSTANCE.read_text(encoding="utf-8"))
    config["run_launcher"] = {"module": "dagster", "class": "DefaultRunLauncher"}
    if "run_monitoring" in config:  # the default launcher cannot resume a run in a new worker: fail it instead
        config["run_monitoring"]["max_resume_run_attempts"] = 0
    config["compute_logs"] = {"module": "dagster._core.storage.local_compute_log_manager",
                              "class": "LocalComputeLogManager",
                              "config": {"base_dir": str(home / "compute_logs")}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return home
