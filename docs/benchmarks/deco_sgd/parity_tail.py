"""Final accuracy minus D-SGD's, averaged over each run's last k evaluations, mean over seeds.

The bench reports the last evaluation only; this reads the per-seed curves from the run
cache, by the same fingerprints the bench uses. Example (the numbers of docs/deco_sgd.md,
"Why the quick high_latency parity misses"):

    .venv/bin/python docs/benchmarks/deco_sgd/parity_tail.py examples/deco_sgd/high_latency.yaml \
        /work/deco_cache/v4/quick_mnist --quick --seeds 0,1,2 --methods deco,static_d0.01_t2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from deco_sgd.bench.config import load_config
from deco_sgd.bench.plan import build_plan
from deco_sgd.bench.runner import _record_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("cache")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="deco")
    ap.add_argument("--last", default="1,3,5,10")
    a = ap.parse_args()
    cfg = load_config(a.config, quick=a.quick)
    seeds = [int(x) for x in a.seeds.split(",")]
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seeds=tuple(seeds)))
    curves = {(s.name, s.seed): json.loads(_record_path(Path(a.cache), cfg, s).read_text())["curve"]
              for s in build_plan(cfg) if s.seed in seeds}
    for name in a.methods.split(","):
        for k in (int(x) for x in a.last.split(",")):
            tail = lambda c: sum(p["metric"] for p in c[-k:]) / k  # noqa: E731
            diffs = [100 * (tail(curves[(name, s)]) - tail(curves[("dsgd", s)])) for s in seeds]
            print(f"{name} last {k:2d}: {sum(diffs) / len(diffs):+.2f} points "
                  f"(seeds {', '.join(f'{d:+.2f}' for d in diffs)})")


if __name__ == "__main__":
    main()
