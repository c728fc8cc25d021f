"""Command line of the real-time mode and the virtual-clock check (docs/design/deco_sgd.md#real-time-validation).

    python -m deco_sgd.bench.realtime --config CFG.yaml --out DIR [--only NAME ...] [--backend netns]
    python -m deco_sgd.bench.realtime --bench SCENARIO.yaml [--results RESULTS.json]
        [--workers N] [--steps S] [--grid-point RATIO TAU] [--backend netns] --out DIR

`--backend emulate` (default) runs each method on fresh local ranks over `netsim.emulate`;
`--backend netns` (root) runs all methods on one set of ranks inside real network namespaces
(`realtime_netns`), where the kernel's TCP and gloo's own collectives meet the shaped link.

`--config` reads this mode's own YAML: the shared `RealRunSpec` fields at the top level and
a `methods:` mapping of name -> DecoConfig fields (plus `adaptive`, `decisions` or `replay`).

`--bench` reads a `deco-sgd bench` scenario (`deco_sgd.bench.config`) and runs the four
validation methods (docs/design/deco_sgd.md#real-time-validation) on its network, task, optimiser and compute time:

1. `dsgd` (δ = 1, τ = 0);
2. one static top-k point (`--grid-point`, default the first of the scenario's grid);
3. `cocktail` (the scenario's chain and staleness);
4. `deco_replayed`: DeCo-SGD's switches from a virtual run's results.json (`--results`,
   `methods.deco.decisions` with `changed`), applied at the same steps; skipped without it.

Each run writes its checkpoints into DIR/realtime.json as it finishes; the exit code is 1
if any checkpoint of a run whose host kept up (`LATE_TIME_MAX`) misses `REL_TOL`, 2 on bad
input (or netns without root).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..config import DecoConfig
from .realtime import REL_TOL, RealResult, RealRunSpec, run_real, validate

__all__ = ["specs_from_config", "specs_from_bench", "replayed_decisions", "main"]

#: Default step budget of a --bench validation run (real time is slow: minutes per method).
_VALIDATION_STEPS = 100


def specs_from_config(cfg: Mapping[str, Any]) -> list[tuple[RealRunSpec, str | None]]:
    """One (spec, replayed method) pair per entry of `methods`; other top-level keys are shared.

    A method entry holds DecoConfig fields plus, optionally, `adaptive: true`, a literal
    `decisions: [[step, ratio, staleness], ...]`, or `replay: NAME`, which replays the
    decision log that the adaptive method NAME (listed earlier) produced in this run.
    """
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("methods"), Mapping) or not cfg["methods"]:
        raise ValueError("config: needs a non-empty `methods` mapping (name -> DecoConfig fields)")
    shared = {k: v for k, v in cfg.items() if k != "methods"}
    known = {f.name for f in dataclasses.fields(RealRunSpec)} - {"name", "deco", "adaptive", "decisions"}
    unknown = sorted(set(shared) - known)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; allowed: {sorted(known) + ['methods']}")
    out: list[tuple[RealRunSpec, str | None]] = []
    for name, m in cfg["methods"].items():
        m = dict(m or {})
        adaptive = bool(m.pop("adaptive", False))
        decisions = tuple(tuple(d) for d in m.pop("decisions", ()))
        replay = m.pop("replay", None)
        if replay is not None:
            earlier = {s.name: s for s, _ in out}
            if replay not in earlier or not earlier[replay].adaptive:
                raise ValueError(f"methods.{name}.replay: must name an adaptive method listed before it, got {replay!r}")
            if decisions:
                raise ValueError(f"methods.{name}: give `decisions` or `replay`, not both")
        out.append((RealRunSpec(name=str(name), deco=m, adaptive=adaptive, decisions=decisions, **shared), replay))
    return out


def replayed_decisions(results: Mapping[str, Any], steps: int) -> tuple[tuple[int, float, int, str | None], ...]:
    """DeCo-SGD's switches (step, ratio, staleness, values) before `steps` from a virtual
    results.json (values None where the log has none)."""
    decs = results.get("methods", {}).get("deco", {}).get("decisions")
    if decs is None:
        raise ValueError("results: no methods.deco.decisions (run `deco-sgd bench` with the deco method)")
    out: dict[int, tuple[int, float, int, str | None]] = {}
    for d in decs:
        if d.get("changed") and int(d["step"]) < steps:
            out[int(d["step"])] = (int(d["step"]), float(d["ratio"]), int(d["staleness"]), d.get("values"))
    return tuple(out[k] for k in sorted(out))


def specs_from_bench(cfg: Any, *, workers: int | None = None, steps: int | None = None,
                     grid_point: tuple[float, int] | None = None,
                     decisions: Sequence[tuple[int, float, int, str | None]] | None = None,
                     seed: int = 0, timeout_s: float = 900.0) -> list[RealRunSpec]:
    """The clock-validation runs of a `deco_sgd.bench.config.BenchConfig` (see the module docstring)."""
    net = cfg.network
    t = cfg.train
    n = cfg.workers if workers is None else workers
    steps = min(t.steps, _VALIDATION_STEPS) if steps is None else steps
    point = cfg.methods.grid[0] if grid_point is None else grid_point
    if cfg.network.trace is not None:
        raise ValueError("network.trace: the real-time CLI takes constant-rate scenarios only "
                         "(use --config with `trace: FILE` for a trace)")
    shared = {"task": cfg.task["name"], "task_config": cfg.task_kwargs, "n": n, "steps": steps,
              "compute_time_s": t.compute_time_s, "bandwidth_mbps": net.bandwidth_mbps,
              "latency_ms": float(net.latency_ms), "lr": t.lr, "momentum": t.momentum, "seed": seed,
              "checkpoint_every": max(1, steps // 5), "timeout_s": timeout_s}
    base = {"timeout_s": 120.0, **cfg.deco, "seed": seed}
    runs = [("dsgd", {"codec": "topk", "ratio": 1.0, "staleness": 0}, ()),
            (f"static_d{point[0]:g}_t{point[1]}", {"codec": "topk", "ratio": point[0], "staleness": point[1]}, ()),
            ("cocktail", {"codec": cfg.methods.cocktail_codec, "ratio": 1.0,
                          "staleness": cfg.methods.cocktail_staleness}, ())]
    if decisions is not None:
        # From the point the virtual run's DeCo-SGD started at (its log holds switches only).
        start = DecoConfig.from_dict({**cfg.deco, "mode": "adaptive"})
        runs.append(("deco_replayed", {"codec": "topk", "ratio": start.ratio, "staleness": start.staleness},
                     tuple(decisions)))
    return [RealRunSpec(name=name, deco={**base, **m}, decisions=d, **shared) for name, m, d in runs]


def _results(specs: Sequence[tuple[RealRunSpec, str | None]], backend: str) -> Iterator[RealResult]:
    """Each method's result, in order (a replayed method gets the log of the one it names)."""
    if backend == "netns":
        from .realtime_netns import run_netns

        yield from run_netns(specs)
        return
    logs: dict[str, list[dict[str, Any]]] = {}
    by_name = {s.name: s for s, _ in specs}
    for spec, replay in specs:
        if replay is not None:
            spec = spec.replaying(by_name[replay], logs[replay])
        print(f"[realtime] {spec.name}: {spec.n} ranks, {spec.steps} steps, decisions {list(spec.decisions)}",
              flush=True)
        res = run_real(spec)
        logs[spec.name] = res.ranks[0]["decisions"]
        yield res


def _run_all(specs: Sequence[tuple[RealRunSpec, str | None]], out: Path, header: dict[str, Any],
             backend: str = "emulate") -> float:
    report: dict[str, Any] = {"schema": 1, "mode": "real", "backend": backend, "rel_tol": REL_TOL, **header,
                              "methods": {}}
    if backend == "netns":
        print(f"[realtime] netns: {len(specs)} methods on {specs[0][0].n} ranks in real namespaces", flush=True)
    for res in _results(specs, backend):
        spec = res.spec
        val = validate(res)
        load = res.ranks[0]["loadavg"]
        report["methods"][spec.name] = {"spec": spec.to_dict(), "validation": val, "loadavg": load,
                                        "decisions": res.ranks[0]["decisions"], "losses": res.ranks[0]["losses"],
                                        "host": [r.get("emulate", r.get("netns")) for r in res.ranks],
                                        "records": [r["steps"] for r in res.ranks]}
        print(f"[realtime] {spec.name} ({backend}, load average {load[0]:.1f} -> {load[1]:.1f}):", flush=True)
        for row in val["checkpoints"]:
            print(f"  step {row['step']:4d}  real {row['real_s']:7.3f} s  virtual {row['virtual_s']:7.3f} s  "
                  f"err {100 * row['rel_err']:5.1f} %   (fixed compute: {row['virtual_fixed_s']:7.3f} s, "
                  f"err {100 * row['rel_err_fixed']:5.1f} %)", flush=True)
        print(f"  host lateness may have cost up to {100 * val['late_time_frac']:.1f} % of the run"
              f"{'' if val['emulation_ok'] else ': the host fell behind, comparison invalid'}"
              f" (late s per rank {[round(x, 3) for x in val['late_s']]}), mean host "
              f"work {1e3 * val['mean_host_s']:.1f} ms/step, final metric {val['final_metric']:.4f}", flush=True)
        (out / "realtime.json").write_text(json.dumps(report, indent=1))
    return max((m["validation"]["max_rel_err"] for m in report["methods"].values()
                if m["validation"]["emulation_ok"]), default=0.0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deco_sgd.bench.realtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML: shared RealRunSpec fields plus `methods:`")
    src.add_argument("--bench", help="a `deco-sgd bench` scenario YAML")
    ap.add_argument("--out", required=True, help="output directory (realtime.json)")
    ap.add_argument("--backend", choices=("emulate", "netns"), default="emulate",
                    help="where the link is: netsim.emulate (default) or real namespaces (root)")
    ap.add_argument("--only", action="append", default=[], help="--config: run only these methods (repeatable)")
    ap.add_argument("--results", help="--bench: a virtual results.json whose DeCo-SGD decisions are replayed")
    ap.add_argument("--workers", type=int, help="--bench: ranks (default: the scenario's workers)")
    ap.add_argument("--steps", type=int, help=f"--bench: steps per run (default min(train.steps, {_VALIDATION_STEPS}))")
    ap.add_argument("--grid-point", nargs=2, type=float, metavar=("RATIO", "TAU"),
                    help="--bench: the static top-k point (default: the scenario's first grid point)")
    args = ap.parse_args(argv)
    from ccomm.configfile import load_mapping

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.config:
            specs = specs_from_config(load_mapping(args.config))
            if args.only:
                keep = set(args.only) | {r for s, r in specs if s.name in args.only and r is not None}
                specs = [(s, r) for s, r in specs if s.name in keep]
            header: dict[str, Any] = {"config": args.config}
        else:
            from .config import load_config

            cfg = load_config(args.bench)
            n_steps = min(cfg.train.steps, _VALIDATION_STEPS) if args.steps is None else args.steps
            decs = None
            if args.results:
                decs = replayed_decisions(load_mapping(args.results, "results"), n_steps)
            point = None if args.grid_point is None else (args.grid_point[0], int(args.grid_point[1]))
            specs = [(s, None) for s in specs_from_bench(cfg, workers=args.workers, steps=args.steps,
                                                         grid_point=point, decisions=decs)]
            header = {"bench": args.bench, "results": args.results, "scenario": cfg.scenario}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"realtime: {e}", file=sys.stderr)
        return 2
    try:
        worst = _run_all(specs, out, header, args.backend)
    except (PermissionError, ValueError) as e:  # netns without root, or runs that cannot share one net
        print(f"realtime: {e}", file=sys.stderr)
        return 2
    print(f"[realtime] worst checkpoint error {100 * worst:.1f} % (tolerance {100 * REL_TOL:.0f} %); "
          f"wrote {out / 'realtime.json'}")
    return 1 if worst > REL_TOL else 0


if __name__ == "__main__":
    sys.exit(main())
