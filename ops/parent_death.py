"""Children that die with the process that started them, even when it is SIGKILLed.

``guarded(argv)`` is ``argv`` behind a tiny exec stub: a fresh, single-threaded
interpreter asks Linux for ``PR_SET_PDEATHSIG`` (SIGKILL when the parent goes),
checks that the parent is still the one that started it, and ``execvp``\\s the
real program, which keeps the pid and the flag (only a set-uid exec clears it).

Why this way (and not the others):

* ``preexec_fn`` would run Python in the forked child of a parent that has
  threads (``asyncio.to_thread`` workers, the child watcher's): a lock another
  thread held at fork (the import lock, a logging handler's, malloc's) can
  deadlock the child before it ever execs, and CPython documents it as unsafe
  for that reason. The stub sets the flag in a process of its own instead.
* A child watching a pipe or polling ``getppid()`` needs code in every child
  (Mosquitto is not ours) and runs only while that child's loop runs: a hung
  child never notices. The kernel delivers PDEATHSIG whatever the child does.
* SIGKILL, not SIGTERM: nobody is left to escalate if a child ignores or hangs
  on SIGTERM, the nodes and the broker are built to survive a crash (atomic
  state files, SQLite transactions, Mosquitto's 1 s autosave), and a killed
  node frees its identity lock at once for the next ``trustpay up``.

Caveats: the "parent" is the *thread* that forked, so start children from the
thread that lives as long as the launcher (asyncio forks on the loop's thread);
elsewhere than Linux the stub is not used (``guarded`` returns ``argv``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

DEATH_SIGNAL = signal.SIGKILL

# Runs as `python -I -S -c STUB PARENT_PID SIGNAL -- PROGRAM ARGS...`; standard library only.
_STUB = """
import ctypes, os, sys
parent, sig, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4:]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, sig, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG): " + os.strerror(ctypes.get_errno()))
if os.getppid() != parent:  # it died between our fork and the prctl: nobody will signal us
    sys.exit("the process that started this one is gone")
os.execvp(argv[0], argv)
"""


def supported() -> bool:
    return sys.platform.startswith("linux")


def guarded(argv: Sequence[str], parent: int | None = None) -> list[str]:
    """``argv`` run so that it gets SIGKILL when ``parent`` (default: this process) dies."""
    if not supported():
        return list(argv)
    pid = os.getpid() if parent is None else parent
    return [sys.executable, "-I", "-S", "-c", _STUB, str(pid), str(int(DEATH_SIGNAL)), "--", *argv]
