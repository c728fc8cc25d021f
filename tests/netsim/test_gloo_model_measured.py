"""gloo's transport model against the table measured on real namespaces (documentation test).

The files under docs/benchmarks/deco_sgd/clock_validation/gloo/ are single gloo all-reduces
and all-gathers timed by `netsim.probe.agent gloo-sweep` (gloo_sweep.sh: n = 2 and 4; 5, 25
and 50 ms one way; 4 B to 3.3 MB per rank; 7 iterations each). No network is used here: the
test reads the recorded times, so it is deterministic. The fastest iteration of each point is
compared (host delays only ever add time). What the table shows, as named bounds:

* the ideal transport (`netsim.cost`) is off by up to 2.3x where segments are short;
* gloo's model is within `POINT_TOL` of every point but `KNOWN_OUTLIERS`, and its median
  error over all points is within `MEDIAN_TOL`.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from netsim import Link, cost
from netsim.model import gloo

DATA = Path(__file__).resolve().parents[2] / "docs/benchmarks/deco_sgd/clock_validation/gloo"
#: Largest |measured / model - 1| of a single point (its fastest of 7 iterations).
POINT_TOL = 0.15
#: Median of |measured / model - 1| over every point.
MEDIAN_TOL = 0.05
#: (n, latency ms, op, bytes): points outside POINT_TOL, with their measured ratio. At 25 ms the
#: 12 kB all-gather's 7 iterations spread 0.21-0.67 s on a host at a load average of 10; the
#: same point at 50 ms is within 13 %.
KNOWN_OUTLIERS = {(4, 25.0, "allgather", 12000): 1.30}


def _points() -> list[tuple[int, float, str, int, float, float, float]]:
    out = []
    for path in sorted(DATA.glob("gloo_n*_l*.json")):
        rec = json.loads(path.read_text())
        link = Link(rec["bandwidth_mbps"], rec["latency_ms"])
        for op, sizes in rec["sweep"].items():
            for size, times in sizes.items():
                b = int(size)
                out.append((rec["n"], rec["latency_ms"], op, b, min(times),
                            gloo.collective_time(op, rec["n"], b, link), cost.collective_time(op, b, link, rec["n"])))
    return out


def test_the_recorded_table_is_complete() -> None:
    pts = _points()
    assert {(n, lat) for n, lat, *_ in pts} == {(2, 5.0), (4, 5.0), (2, 25.0), (4, 25.0), (4, 50.0)}
    assert len(pts) == 5 * 2 * 7


def test_gloo_model_matches_the_measured_table() -> None:
    pts = _points()
    errs = []
    for n, lat, op, b, real, model, _ in pts:
        ratio = real / model
        errs.append(abs(ratio - 1.0))
        known = KNOWN_OUTLIERS.get((n, lat, op, b))
        if known is not None:
            assert ratio == pytest.approx(known, abs=0.01)
        else:
            assert abs(ratio - 1.0) <= POINT_TOL, (n, lat, op, b, real, model)
    assert statistics.median(errs) <= MEDIAN_TOL


def test_the_ideal_transport_misses_short_segments() -> None:
    # Where a message serialises in less than one latency (gloo's all-reduce segments are
    # S/(2n), its all-gather sends halves) the notice is exposed and the ideal ring is far off
    # (up to 2.3x); there the gloo model is closer at every point. Elsewhere both are within a
    # few percent. The 0.2 MB all-reduce of the validation runs (4 ranks, 25 ms) is the case.
    pts = _points()
    assert max(real / ideal for *_, real, _m, ideal in pts) > 2.0
    exposed = 0
    for n, lat, op, b, real, model, ideal in pts:
        if (n, lat, op, b) == (4, 25.0, "allreduce", 204000):
            assert real / ideal > 1.35 and abs(real / model - 1.0) < 0.02
        message = b / (2 * n) if op == "allreduce" else b / 2
        if message / (20e6 / 8) < lat / 1e3:
            exposed += 1
            assert abs(real / model - 1.0) < abs(real / ideal - 1.0), (n, lat, op, b)
    assert exposed >= 30
