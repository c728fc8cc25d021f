"""`deco-sgd` command line: `bench`, `realtime` and `calibrate`
(docs/design/deco_sgd.md#benchmark, docs/design/deco_sgd.md#real-time-validation,
docs/design/deco_sgd.md#template-surrogate).

    deco-sgd bench CONFIG.yaml --out DIR [--quick] [--cache DIR] [--seeds 0,1,2]
    deco-sgd realtime (--bench CONFIG.yaml [--results R.json] | --config RT.yaml) --out DIR [...]
    deco-sgd calibrate DIR/results.json [--r R]

`bench` trains every method of the scenario in virtual time and writes DIR/results.json,
DIR/report.md and the PNG plots, then prints the report. `realtime` runs the same methods as
n gloo processes over `netsim.emulate` in real time and checks the virtual clock against the
wall clock (its options are those of `python -m deco_sgd.bench.realtime`). `calibrate` fits the surrogate's
b and κ (`deco_sgd.controller.fit_surrogate`) to the static grid's steps to target in a
results.json and prints the YAML lines to freeze in the example configs.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import shlex
import statistics
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser", "calibrate"]


EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="deco-sgd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time-to-accuracy benchmark of every method on one scenario (virtual time)")
    b.add_argument("config", help="scenario YAML, e.g. examples/deco_sgd/high_latency.yaml")
    b.add_argument("--out", required=True, help="output directory (results.json, report.md, PNGs)")
    b.add_argument("--quick", action="store_true", help="quick mode: n=4, seed 0, mnist, 300 steps, 3-point grid")
    b.add_argument("--cache", default=None,
                   help="directory of run records to reuse (default DIR/runs); share it between scenarios "
                        "so static methods train once")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--seeds", default=None,
                   help="comma-separated seeds replacing the config's (and --quick's seed 0), e.g. 0,1,2")
    sub.add_parser("realtime", add_help=False,
                   help="real-time mode over netsim.emulate and the virtual-vs-real clock check "
                        "(`deco-sgd realtime --help` for its options)")
    c = sub.add_parser("calibrate", help="fit the surrogate's b and kappa to a results.json's static grid")
    c.add_argument("results", help="results.json of a bench run with the static grid")
    c.add_argument("--r", type=float, default=None,
                   help="sigma^2/G^2 to fit with (default: DeCo-SGD's final estimate in the results, mean over seeds)")
    return ap


def _median_steps(m: dict) -> float | None:
    """Median steps to target over seeds (unreached = inf); None when the median is inf."""
    steps = [float("inf") if ps["steps_to_target"] is None else float(ps["steps_to_target"]) for ps in m["per_seed"]]
    med = statistics.median(steps)
    return None if med == float("inf") else med


def calibrate(results: dict, r: float | None = None) -> dict:
    """Fit b and κ to (δ, τ, median steps to target) of the grid members that reached the target."""
    from .config import DecoConfig
    from .controller import fit_surrogate

    meth = results["methods"]
    samples = []
    for name, m in meth.items():
        if m["kind"] != "static" or name == "best_static":
            continue
        med = _median_steps(m)
        if med is not None:  # members that never reached the target (censored) are left out
            samples.append((float(m["params"]["ratio"]), int(m["params"]["staleness"]), med))
    med = _median_steps(meth["dsgd"])
    if med is not None:
        samples.append((1.0, 0, med))
    if r is None:
        ests = [ps["r_est"] for ps in meth.get("deco", {}).get("per_seed", []) if ps.get("r_est") is not None]
        if not ests:
            raise ValueError("r: no DeCo-SGD estimate of sigma^2/G^2 in the results; pass --r")
        r = sum(ests) / len(ests)
    base = DecoConfig.from_dict({k: v for k, v in results["config"]["deco"].items()
                                 if k not in ("b", "kappa")} | {"mode": "static"})
    n = int(results["config"]["workers"])
    fit = fit_surrogate(samples, base, r=r, n=n)
    return {"b": fit.b, "kappa": fit.kappa, "scale": fit.scale, "rms_log_error": fit.rms_log_error,
            "n_samples": fit.n_samples, "r": r, "n": n, "samples": samples}


def _cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .bench.config import load_config, with_seeds
    from .bench.runner import BenchFailed, run_bench

    from ccomm.configfile import ConfigFileError, writable_dir

    try:
        cfg = load_config(args.config, quick=args.quick)
        if args.seeds is not None:
            cfg = with_seeds(cfg, args.seeds)
        writable_dir(args.out)
        if args.cache is not None:
            writable_dir(args.cache, "--cache")
    except ConfigFileError as e:  # already `file:line: message`
        print(f"deco-sgd bench: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, ValueError) as e:
        print(f"deco-sgd bench: {args.config}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    command = "deco-sgd " + " ".join(shlex.quote(a) for a in argv)
    try:
        run_bench(cfg, args.out, cache_dir=args.cache, progress=not args.no_progress,
                  echo=lambda s: print(s, file=sys.stderr), command=command)
    except BenchFailed as e:
        print(f"deco-sgd bench: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(Path(args.out, "report.md").read_text())
    return 0


def _cmd_calibrate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from ccomm.configfile import ConfigFileError, load_mapping

    try:
        res = load_mapping(args.results, "results")
    except ConfigFileError as e:
        print(f"deco-sgd calibrate: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        out = calibrate(res, args.r)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # A mapping of the wrong layout: name what is missing instead of a traceback.
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        print(f"deco-sgd calibrate: {args.results}: not a `deco-sgd bench` results.json ({what})", file=sys.stderr)
        return EXIT_BAD_INPUT
    today = datetime.date.today().isoformat()
    cmd = "deco-sgd " + " ".join(shlex.quote(a) for a in argv)
    print(f"# samples (ratio, staleness, median steps to target): {out['samples']}")
    print(f"# fit: scale={out['scale']:.4g}, rms log error={out['rms_log_error']:.3f}, r={out['r']:.4g}, n={out['n']}")
    print(f"  # fitted by `{cmd}` on {today}")
    print(f"  b: {out['b']:.6g}")
    print(f"  kappa: {out['kappa']:.6g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["realtime"]:
        # Forwarded whole: the real-time mode owns its options (deco_sgd.bench.realtime_cli).
        from .bench.realtime_cli import main as realtime_main

        return realtime_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "bench":
        return _cmd_bench(args, argv)
    return _cmd_calibrate(args, argv)
