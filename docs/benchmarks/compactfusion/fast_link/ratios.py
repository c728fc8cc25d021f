"""Issue 11's unshaped-overhead target from `fast_link` runs: compressed ring / uncompressed ring.

    python docs/benchmarks/compactfusion/fast_link/ratios.py RUN_DIR [RUN_DIR ...]

Reads each run's `results.json` (P = 2, `ranks2.methods`) and prints one Markdown row per run:
the medians and their ratio (what the report shows; the target is at most 1.10, a miss is given in percentage points), and the median of the per-round ratios
(the methods run round-robin, so sample i of every method comes from the same round and the
same moment's load), with the 1-minute load average at the run's start and end.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METHODS = ("ring+binary", "ring+int2")
TARGET = 1.10


def row(run: Path) -> str:
    res = json.loads((run / "results.json").read_text())
    m = res["ranks2"]["methods"]
    ring = m["ring"]
    cells = [run.name, f"{res['host']['loadavg_at_start'][0]:.2f} / {res['host']['loadavg_at_end'][0]:.2f}",
             f"{ring['latency_s']:.3f} ({ring['latency_iqr_s']:.3f})"]
    for name in METHODS:
        x = m[name]
        med = x["latency_s"] / ring["latency_s"]
        paired = statistics.median(a / b for a, b in zip(x["latency_samples"], ring["latency_samples"]))
        verdict = "met" if med <= TARGET else f"missed by {100 * (med - TARGET):.1f} pp"
        cells.append(f"{x['latency_s']:.3f} ({x['latency_iqr_s']:.3f}) | {med:.3f}, {verdict} | {paired:.3f}")
    cells.append(f"{m['single']['latency_s']:.3f}")
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> None:
    print("| run | 1-min load start / end | ring s (IQR) | ring+binary s (IQR) | ÷ ring (medians) | "
          "median of per-round ratios | ring+int2 s (IQR) | ÷ ring (medians) | median of per-round ratios | single s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in argv:
        print(row(Path(d)))


if __name__ == "__main__":
    main(sys.argv[1:])
