"""Stopping a helper process that was started in a session of its own (``start_new_session=True``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_session(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the process's whole group, then SIGKILL if it has not ended within ``grace_s``; a no-op for a
    process that already ended."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
