"""Measured gloo collectives (gloo_sweep.sh's JSON files) against the ideal and gloo transports.

    PYTHONPATH=$PWD .venv/bin/python docs/benchmarks/deco_sgd/clock_validation/gloo_table.py \
        docs/benchmarks/deco_sgd/clock_validation/gloo

Prints one markdown table per file: per op and size, the fastest and the median of the
iterations, the ideal ring (`netsim.cost`) and gloo's transport (`netsim.model.gloo`, notices
queued behind data on their uplink, and, for reference, skipping it), each with measured min / model.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from netsim import Link, cost
from netsim.model import gloo


def table(path: Path) -> str:
    rec = json.loads(path.read_text())
    n, link = rec["n"], Link(rec["bandwidth_mbps"], rec["latency_ms"])
    out = [f"n = {n}, {rec['bandwidth_mbps']:g} Mbit/s, {rec['latency_ms']:g} ms one way; load average "
           f"{rec['loadavg_before']} -> {rec['loadavg_after']}; commit {rec['commit']}", "",
           "| op | bytes per rank | measured min (s) | median | ideal ring | min/ideal | gloo model | min/gloo "
           "| notices skip the backlog | min/skip |", "|---|---|---|---|---|---|---|---|---|---|"]
    for op, sizes in rec["sweep"].items():
        for size, times in sizes.items():
            b = int(size)
            lo, med = min(times), statistics.median(times)
            ideal = cost.collective_time(op, b, link, n)
            model = gloo.collective_time(op, n, b, link)
            skip = max(gloo.simulate(gloo.program(op, n, b), link, notices_queue=False))
            out.append(f"| {op} | {b} | {lo:.3f} | {med:.3f} | {ideal:.3f} | {lo / ideal:.2f} | {model:.3f} | "
                       f"{lo / model:.2f} | {skip:.3f} | {lo / skip:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    for p in sorted(Path(sys.argv[1]).glob("gloo_n*_l*.json")):
        print(table(p), end="\n\n")
