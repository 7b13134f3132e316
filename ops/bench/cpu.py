"""CPU time of processes, from /proc: what each role of a run cost, children included."""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return []
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return stat[stat.rindex(")") + 2 :].split()


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def cpu_seconds(pid: int, tree: dict[int, list[int]] | None = None) -> tuple[float, float]:
    """User + system CPU of ``pid``, and of all its descendants, live or reaped.

    Descendants count too (a chip's fork server for app workers, and that
    server's children once it reaped them). Zeros for a process that is gone.
    """
    fields = _stat(pid)
    if not fields:
        return 0.0, 0.0
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    tree = _children_of() if tree is None else tree
    below = (cutime + cstime) * _TICK_S
    for child in tree.get(pid, ()):
        own, theirs = cpu_seconds(child, tree)
        below += own + theirs
    return (utime + stime) * _TICK_S, below


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class CpuMeter:
    """CPU seconds per named process between ``start`` and ``stop``.

    A process's descendants (the chip's app workers) are said apart, as ``NAME+children``.
    """

    pids: dict[str, int]
    own_only: frozenset[str] = frozenset()  # processes whose descendants are measured by name already

    def __post_init__(self) -> None:
        self._start: dict[str, tuple[float, float]] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        tree = _children_of()
        self._start = {name: cpu_seconds(pid, tree) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {}
        tree = _children_of()
        for name, pid in self.pids.items():
            (own, children), (own0, children0) = cpu_seconds(pid, tree), self._start[name]
            self.used[name] = own - own0
            if name not in self.own_only and children - children0 > 0:
                self.used[f"{name}+children"] = children - children0
        return self.used
