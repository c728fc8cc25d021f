"""Six-seed numbers of docs/deco_sgd.md ("Fresh seeds 3–5"): the per-seed results of two bench
output directories of one scenario pooled, times as medians over the seeds that reached the
target, final metric as the mean. Reads only `results.json`. Example:

    python3 docs/benchmarks/deco_sgd/pooled_seeds.py docs/benchmarks/deco_sgd/quick_varying_bandwidth \
        docs/benchmarks/deco_sgd/fresh_seeds_345/quick_varying_bandwidth
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    per: dict[str, list[dict]] = {}
    best = None
    for d in dirs:
        res = json.loads((Path(d) / "results.json").read_text())
        best = res["best_static"]["name"]  # the last directory's, as its report names it
        for name, m in res["methods"].items():
            per.setdefault(name, []).extend(m.get("per_seed", []))
    times = {k: statistics.median(t) for k, v in per.items()
             if (t := [p["time_to_target_s"] for p in v if p["time_to_target_s"] is not None])}
    final = {k: statistics.mean(p["final_metric"] for p in v) for k, v in per.items() if v}
    d = times["deco"]
    print(f"seeds {len(per['deco'])}: deco {d:.1f} s; vs dsgd {times['dsgd'] / d:.2f}x", end="")
    for other in ("cocktail", best, "static_apriori"):
        if other in times:
            print(f"; vs {other} {times[other] / d:.2f}x", end="")
    print(f"; deco final - dsgd {100 * (final['deco'] - final['dsgd']):+.2f} points")


if __name__ == "__main__":
    main(sys.argv[1:])
