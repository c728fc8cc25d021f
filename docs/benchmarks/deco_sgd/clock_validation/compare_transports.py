"""One real-time run's checkpoints replayed with both transport profiles (docs/deco_sgd.md, clock validation).

    PYTHONPATH=$PWD .venv/bin/python docs/benchmarks/deco_sgd/clock_validation/compare_transports.py DIR/realtime.json

For every method of a `deco_sgd.bench.realtime` report: the real elapsed time at each
checkpoint, the error of the replay charging gloo's transport (what the check uses on netns)
and of the same replay charging the ideal ring (what it used before), the host-lateness
estimate (netns: recomputed with this checkout's `transport_late_s`, the wire's stalls as
recorded) and the wait per step (median and fastest). The replay is `vclock.replay` of the
recorded schedule (`realtime.step_records`; constant links, so the start time does not matter).
"""
from __future__ import annotations

import json
import statistics
import sys

from deco_sgd.bench.realtime import RealResult, RealRunSpec, checkpoints, step_records
from deco_sgd.bench.realtime_netns import transport_late_s
from deco_sgd.bench.vclock import replay


def main(path: str) -> None:
    rep = json.load(open(path))
    print(f"backend {rep['backend']}; errors at the checkpoints, real vs virtual elapsed time\n")
    print("| method | real (s) | error, gloo transport (%) | error, ideal ring (%) | host lateness | wait per step, "
          "median / fastest (s) | load average |")
    print("|---|---|---|---|---|---|---|")
    for name, m in rep["methods"].items():
        spec = RealRunSpec(**{**m["spec"], "decisions": tuple(tuple(d) for d in m["spec"]["decisions"])})
        res = RealResult(spec, [{"steps": s, "t0_emu": 0.0} for s in m["records"]], backend=rep["backend"])
        recs = step_records(res)
        real = res.real_ends
        pts = checkpoints(spec)
        errs = {}
        for transport in ("gloo", "ideal"):
            ends = replay(recs, spec.link(), spec.n, spec.compute_time_s, transport=transport)
            errs[transport] = " / ".join(f"{100 * abs(ends[k - 1] - real[k - 1]) / real[k - 1]:.1f}" for k in pts)
        waits = [max(r[s]["end"] for r in m["records"]) - max(r[s]["launch"] for r in m["records"])
                 for s in range(spec.steps)]
        val = m["validation"]
        load = m["loadavg"]
        if rep["backend"] == "netns":
            late = max(h["wire_stall_s"] + transport_late_s({"steps": st, "netns": h}, spec.n)
                       for h, st in zip(m["host"], m["records"]))
            val = {**val, "late_time_frac": late / real[-1]}
        print(f"| {name} | {' / '.join(f'{real[k - 1]:.2f}' for k in pts)} | {errs['gloo']} | {errs['ideal']} | "
              f"{100 * val['late_time_frac']:.1f} % | {statistics.median(waits):.3f} / {min(waits):.3f} | "
              f"{load[0]:.0f} → {load[1]:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
