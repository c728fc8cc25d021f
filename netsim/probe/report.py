"""What a probe reports: one row per host pair and per gloo op, and the tolerances they are judged by.

Shared by the namespace probe (:mod:`netsim.probe.namespace`) and the in-process one
(:mod:`netsim.probe.emulated`); it imports neither, so neither imports the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BW_TOL", "GLOO_TOL", "OMIT_BDPS", "P2P_TOL", "RTT_TOL_ABS_S", "RTT_TOL_REL",
           "GlooResult", "PairResult", "ProbeReport"]

BW_TOL = 0.05
RTT_TOL_ABS_S = 1e-3
RTT_TOL_REL = 0.02
P2P_TOL = 0.05
GLOO_TOL = 0.10
#: Bandwidth-delay products sent before the goodput clock starts.
OMIT_BDPS = 8


@dataclass(frozen=True)
class PairResult:
    src: int
    dst: int
    rtt_config_s: float
    rtt_median_s: float
    rtt_min_s: float
    rtt_max_s: float
    rtt_ok: bool
    bw_config_mbps: float | None
    bw_mbps: float
    bw_ok: bool
    completion_s: float
    model_s: float
    duplex_mbps: tuple[float, float] | None = None
    duplex_ok: bool = True
    bw_whole_mbps: float = math.nan  # from the first byte, slow start included

    @property
    def ok(self) -> bool:
        return self.rtt_ok and self.bw_ok and self.duplex_ok


@dataclass(frozen=True)
class GlooResult:
    op: str
    n: int
    nbytes: int
    measured_s: float
    model_s: float
    tol: float

    @property
    def ratio(self) -> float:
        return self.measured_s / self.model_s

    @property
    def ok(self) -> bool:
        return abs(self.ratio - 1.0) <= self.tol


@dataclass(frozen=True)
class ProbeReport:
    pairs: tuple[PairResult, ...]
    gloo: tuple[GlooResult, ...] = ()
    wire: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default=())
    #: Emulate backend only: operations whose real transport finished after their modeled
    #: time, summed over the ranks (``emu.stats.late_ops``); those measured the host, not the link.
    late_ops: int | None = None

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.pairs) and all(g.ok for g in self.gloo)

    def table(self) -> str:
        """Configured beside measured, one row per pair (and per gloo op)."""
        rows = ["pair    rtt cfg ms  rtt med ms  [min, max]          bw cfg Mbit/s  bw Mbit/s"
                "  duplex Mbit/s  whole Mbit/s  ok"]
        for p in self.pairs:
            cfg = f"{p.bw_config_mbps:.2f}" if p.bw_config_mbps is not None else "trace"
            dup = "-" if p.duplex_mbps is None else "%.2f/%.2f" % p.duplex_mbps
            rows.append(f"{p.src}->{p.dst}  {p.rtt_config_s * 1e3:10.3f}  "
                        f"{p.rtt_median_s * 1e3:10.3f}  [{p.rtt_min_s * 1e3:.2f}, "
                        f"{p.rtt_max_s * 1e3:.2f}]  {cfg:>13}  {p.bw_mbps:9.2f}  {dup:>13}  "
                        f"{p.bw_whole_mbps:12.2f}  {'yes' if p.ok else 'NO'}")
        for g in self.gloo:
            rows.append(f"gloo {g.op} n={g.n} {g.nbytes} B: {g.measured_s:.3f} s vs model "
                        f"{g.model_s:.3f} s (x{g.ratio:.3f}, tol {g.tol:.0%}) "
                        f"{'yes' if g.ok else 'NO'}")
        if self.late_ops:
            rows.append(f"emulate: {self.late_ops} operation(s) finished after their modeled time "
                        "(the host did not keep up; those measurements are of the host)")
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "pairs": [vars(p) for p in self.pairs],
                "gloo": [{**vars(g), "ratio": g.ratio, "ok": g.ok} for g in self.gloo],
                "wire": self.wire, "notes": list(self.notes), "late_ops": self.late_ops}
