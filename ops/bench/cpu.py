"""CPU time of processes, from /proc: what each role of a run cost, children included."""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of the children it has reaped (a chip's app workers).

    Zero for a process that is gone (its CPU can no longer be read).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return 0.0
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) * _TICK_S


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
    """CPU seconds per named process between ``start`` and ``stop``."""

    pids: dict[str, int]

    def __post_init__(self) -> None:
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used
