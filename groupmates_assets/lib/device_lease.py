"""Leases of GPU devices on one host, so concurrent steps never share a device.

A Dagster pool limits how many GPU steps run at once but does not say which device each one gets. Each device
here is a lock file taken with ``flock``: the kernel releases it when the holding process exits, so a crashed
or killed step frees its device without any clean-up. Plain Python (no Dagster, no torch).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

DEFAULT_LOCK_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "groupmates-gpu-locks")


class LeaseTimeout(TimeoutError):
    """No set of free devices within the timeout; the message names who holds them."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class DeviceLease:
    """Exclusive leases over ``devices`` (indices as CUDA numbers them on this host)."""

    def __init__(self, devices: Sequence[int], lock_dir: str = DEFAULT_LOCK_DIR) -> None:
        if not devices:
            raise ValueError("no devices to lease")
        self.devices = list(devices)
        self.lock_dir = Path(lock_dir)

    def _try(self, device: int, owner: str):
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_dir / f"gpu-{device}.lock", "a+")  # noqa: SIM115 - held open for the lease
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{owner} pid {os.getpid()}\n")
        handle.flush()
        return handle

    @contextlib.contextmanager
    def acquire(self, count: int = 1, owner: str = "", timeout: float | None = None,
                poll_seconds: float = 1.0) -> Iterator[list[int]]:
        """Hold ``count`` free devices for the block; waits (up to ``timeout`` seconds) until enough are free."""
        if not 1 <= count <= len(self.devices):
            raise ValueError(f"cannot lease {count} of {len(self.devices)} devices")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            held = []
            for device in self.devices:
                handle = self._try(device, owner)
                if handle is not None:
                    held.append((device, handle))
                    if len(held) == count:
                        break
            if len(held) == count:
                break
            for _, handle in held:
                handle.close()  # all or nothing: never sit on part of a request
            if deadline is not None and time.monotonic() >= deadline:
                holders = ", ".join(f"GPU {d}: {_holder(self.lock_dir / f'gpu-{d}.lock')}" for d in self.devices)
                raise LeaseTimeout(f"no {count} free GPU(s) of {self.devices} within {timeout:.0f} s ({holders})")
            time.sleep(poll_seconds)
        try:
            yield [device for device, _ in held]
        finally:
            for _, handle in held:
                handle.close()


def visible_devices(ids: Sequence[int]) -> dict[str, str]:
    """Environment that shows a child process only the leased devices (torchrun, Pipes subprocesses)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in ids)}
