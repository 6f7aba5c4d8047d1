"""Named points where the crash tests kill a step, as a real crash would: between writes, in the middle of one
(the data complete under its temporary name, not yet renamed) and in the middle of computing.

Two environment variables drive it, both unset outside the tests (then ``hit`` costs two lookups):
  ``GROUPMATES_FAILPOINTS_LOG``      a file; every point passed appends its name, from every process of the
                                     step (replica workers included), under a lock
  ``GROUPMATES_FAILPOINTS_KILL_AT``  N (with the log): the process that passes the N-th point SIGKILLs its whole
                                     process group, as when a machine dies; start the step in a session of its own
No Python cleanup runs after the kill (no ``finally``, no atexit): exactly what a power cut or the OOM killer
leaves behind.
"""

import fcntl
import os
import signal

LOG_ENV = "GROUPMATES_FAILPOINTS_LOG"
KILL_AT_ENV = "GROUPMATES_FAILPOINTS_KILL_AT"


def hit(name: str) -> None:
    """Mark that execution reached the point ``name`` (see the module docstring)."""
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
