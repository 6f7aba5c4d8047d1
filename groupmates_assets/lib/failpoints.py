"""Named points where the crash tests kill the process, as a real crash would: between writes, in the middle of
one (the data complete under its temporary name, not yet renamed) and in the middle of computing.

Two environment variables drive it, both unset outside the tests (then ``hit`` costs one lookup):
  ``GROUPMATES_FAILPOINTS_LOG``      a file; every point passed appends its name (counts an uninterrupted run)
  ``GROUPMATES_FAILPOINTS_KILL_AT``  N: the process SIGKILLs itself at the N-th point it passes
No Python cleanup runs after the kill (no ``finally``, no atexit): exactly what a power cut or the OOM killer
leaves behind.
"""

import os
import signal

LOG_ENV = "GROUPMATES_FAILPOINTS_LOG"
KILL_AT_ENV = "GROUPMATES_FAILPOINTS_KILL_AT"
_passed = 0


def hit(name: str) -> None:
    """Mark that execution reached the point ``name`` (see the module docstring)."""
    log, kill_at = os.environ.get(LOG_ENV), os.environ.get(KILL_AT_ENV)
    if not log and not kill_at:
        return
    global _passed
    _passed += 1
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{name}\n")
    if kill_at and _passed == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
