"""CPU time of processes, from /proc: what each role of a run cost, children included."""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU of ``pid``, and of the children it has reaped (a chip's app workers).

    Zeros for a process that is gone (its CPU can no longer be read).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return 0.0, 0.0
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime) * _TICK_S, (cutime + cstime) * _TICK_S


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

    A process's reaped children (the chip's app workers) are said apart, as ``NAME+children``.
    """

    pids: dict[str, int]

    def __post_init__(self) -> None:
        self._start: dict[str, tuple[float, float]] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {}
        for name, pid in self.pids.items():
            (own, children), (own0, children0) = cpu_seconds(pid), self._start[name]
            self.used[name] = own - own0
            if children - children0 > 0:
                self.used[f"{name}+children"] = children - children0
        return self.used
