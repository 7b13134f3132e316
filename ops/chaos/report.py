"""A chaos run's report: what was done to the links, what the system did, and each invariant's verdict."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .invariants import Evidence, Verdict, summary


@dataclass(frozen=True)
class Report:
    scenario: str
    seed: int
    devices: int
    backend: str
    payments: dict[str, int]  # by how they ended
    latency_ms: dict[str, float]  # a user's wait, client process start to result
    faults: dict[str, int]  # applied, by kind
    rejects: dict[str, int]  # frames the nodes refused, by reason
    verdicts: tuple[Verdict, ...]
    notes: tuple[str, ...]
    storm_s: float
    total_s: float
    run_dir: str

    @property
    def held(self) -> bool:
        return all(v.held for v in self.verdicts)

    @classmethod
    def build(
        cls,
        *,
        scenario: str,
        seed: int,
        devices: int,
        backend: str,
        verdicts: Sequence[Verdict],
        evidence: Evidence,
        faults: Mapping[str, int],
        rejects: Mapping[str, int],
        notes: Sequence[str],
        storm_s: float,
        total_s: float,
        run_dir: Path,
    ) -> Report:
        return cls(
            scenario,
            seed,
            devices,
            backend,
            summary(evidence.attempts, evidence.resolutions),
            percentiles([a.latency_ms for a in evidence.attempts]),
            dict(sorted(faults.items())),
            dict(sorted(rejects.items())),
            tuple(verdicts),
            tuple(notes),
            round(storm_s, 1),
            round(total_s, 1),
            str(run_dir),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "devices": self.devices,
            "backend": self.backend,
            "held": self.held,
            "payments": self.payments,
            "latency_ms": self.latency_ms,
            "faults": self.faults,
            "rejects": self.rejects,
            "invariants": [
                {"number": v.number, "name": v.name, "held": v.held, "evidence": list(v.evidence)}
                for v in self.verdicts
            ],
            "notes": list(self.notes),
            "storm_s": self.storm_s,
            "total_s": self.total_s,
            "run_dir": self.run_dir,
        }

    def text(self) -> str:
        pay = self.payments
        lines = [
            f"chaos run {self.scenario}  seed {self.seed}  {self.devices} devices  {self.backend}  "
            f"storm {self.storm_s:.1f} s, whole run {self.total_s:.1f} s",
            f"  payments   {_counts(pay) or 'none'}",
            f"  latency    {_latency(self.latency_ms)}",
            f"  faults     {_counts(self.faults) or 'none'}",
            f"  rejects    {_counts(self.rejects) or 'none'}",
        ]
        lines += [f"  note       {n}" for n in self.notes]
        lines.append("  invariants")
        for v in self.verdicts:
            lines.append(f"    {v.line()}")
            lines += [f"         - {e}" for e in v.evidence]
        verdict = "every invariant held" if self.held else "INVARIANTS BROKEN"
        lines.append(f"  {verdict}; report and logs in {self.run_dir}")
        return "\n".join(lines)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "p50": round(statistics.median(ordered), 1),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(ordered[-1], 1),
    }


def _counts(counts: Mapping[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in counts.items())


def _latency(ms: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.0f} ms" for k, v in ms.items()) or "-"
