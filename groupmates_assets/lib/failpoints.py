"""Named points where the crash tests kill a step, as a real crash would: between writes, in the middle of one
(the data complete under its temporary name, not yet renamed) and in the middle of computing.

Environment variables drive it, all unset outside the tests (then ``hit`` costs three lookups):
  ``GROUPMATES_FAILPOINTS_LOG``      a file; every point passed appends its name, from every process of the
                                     step (replica workers included), under a lock
  ``GROUPMATES_FAILPOINTS_KILL_AT``  N (with the log): the process that passes the N-th point SIGKILLs its whole
                                     process group, as when a machine dies; start the step in a session of its own
No Python cleanup runs after the kill (no ``finally``, no atexit): exactly what a power cut or the OOM killer
leaves behind.

A transient error instead of a kill, for the step-retry tests:
  ``GROUPMATES_FAILPOINTS_RAISE_ONCE``  ``NAME`` or ``NAME:ERROR`` (ERROR: OSError, the default, MemoryError or
                                        TimeoutError): the first pass of the point ``NAME`` raises that error;
  ``GROUPMATES_FAILPOINTS_RAISE_MARKER`` a file, created by that first pass: while it exists the point passes
                                        (across retries and processes), so exactly one attempt fails
"""

import fcntl
import os
import signal

LOG_ENV = "GROUPMATES_FAILPOINTS_LOG"
KILL_AT_ENV = "GROUPMATES_FAILPOINTS_KILL_AT"
RAISE_ONCE_ENV = "GROUPMATES_FAILPOINTS_RAISE_ONCE"
RAISE_MARKER_ENV = "GROUPMATES_FAILPOINTS_RAISE_MARKER"
_INJECTED_ERRORS = {"OSError": OSError, "MemoryError": MemoryError, "TimeoutError": TimeoutError}


def hit(name: str) -> None:
    """Mark that execution reached the point ``name`` (see the module docstring)."""
    raise_once = os.environ.get(RAISE_ONCE_ENV)
    if raise_once:
        _raise_once(name, raise_once)
    log = os.environ.get(LOG_ENV)
    if not log:
        return
    with open(log, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # one count across the step's processes
        handle.write(f"{name}\n")
        handle.flush()
        handle.seek(0)
        passed = sum(1 for _ in handle)
        kill_at = os.environ.get(KILL_AT_ENV)
        if kill_at and passed == int(kill_at):
            os.killpg(os.getpgrp(), signal.SIGKILL)


def _raise_once(name: str, spec: str) -> None:
    point, _, error = spec.partition(":")
    if point != name:
        return
    marker = os.environ.get(RAISE_MARKER_ENV)
    if not marker:
        raise ValueError(f"{RAISE_ONCE_ENV} needs {RAISE_MARKER_ENV}: the file that marks the error as raised")
    error_type = _INJECTED_ERRORS.get(error or "OSError")
    if error_type is None:
        raise ValueError(f"{RAISE_ONCE_ENV}: error must be one of {', '.join(_INJECTED_ERRORS)}, got {error!r}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # exactly one pass wins, across processes
    except FileExistsError:
        return
    raise error_type(f"injected at failpoint {name} (transient: {RAISE_ONCE_ENV})")
