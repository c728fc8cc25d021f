"""`run_bench`: every method of a scenario on n gloo workers, in virtual time (docs/design/deco_sgd.md#virtual-time).

1. `build_plan` lists the (method, seed) runs. Each run has a fingerprint: a hash of what
   its training trajectory depends on (task, workers, training settings, the `deco`
   section (its controller fields only for deco and static_apriori), the method and seed,
   and the network for the methods whose behaviour depends on it: deco, static_apriori,
   dga). A run whose record is already in the cache directory is not trained again; static
   methods so train once and serve every scenario. Records carry the digest of the code that
   trained them (`provenance`): a DeCo-SGD or static-a-priori record made by other code is
   trained again, and the report counts the other reused runs that came from other code.
2. The remaining runs go to n spawned processes (1 torch thread each), which join one gloo
   group and execute them in plan order (`methods.run_method`); rank 0 writes one JSON
   record per run and drives the progress bar. The ranks run under `ccomm.ranks.run_ranks`:
   a rank that fails sends its traceback, and the parent stops the others and raises
   `BenchFailed`.
3. Every record is re-timed on this scenario's link with `vclock.replay` from its step log.
   For runs trained here, the replayed times must equal the ones measured online (a
   self-check of the accounting); cached runs get this scenario's times, static ones with
   the all-gather algorithm ``algo="auto"`` picks on this link (`retime`).
4. `report.build_results` applies the target rule and writes results.json, report.md, plots.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from ccomm.ranks import RankError, run_ranks

from .config import BenchConfig
from .plan import RunSpec, build_plan, first_decision
from .provenance import code_digest
from .vclock import replay

__all__ = ["run_bench", "fingerprint", "NETWORK_DEPENDENT", "BenchFailed", "retime"]


#: Methods whose trajectory depends on the network (their runs cannot be shared across scenarios).
NETWORK_DEPENDENT = ("deco", "static_apriori", "dga")
#: Methods whose trajectory depends on the adaptive controller's settings (DGA's delay comes
#: from the a-priori network alone, `baselines.dga_delay`).
CONTROLLED = ("deco", "static_apriori")
#: DecoConfig fields only the adaptive controller reads: static runs do not depend on them,
#: so calibrating the surrogate does not invalidate cached static runs.
CONTROLLER_FIELDS = frozenset({
    "a", "b", "c", "kappa", "eps_rel", "phi", "phi_base", "ratio_grid", "measure_every", "decide_every",
    "change_threshold", "hysteresis", "min_dwell_steps", "decision_mode", "lut_rebuild_threshold", "ema_comp",
    "ema_bandwidth", "ema_grad", "bw_min_transfer_frac", "latency_window", "sigma_coords", "tau_max",
})


class BenchFailed(RuntimeError):
    """A rank failed or the run timed out; the message carries the rank's traceback."""


def fingerprint(cfg: BenchConfig, spec: RunSpec) -> str:
    """Hash of everything the run's trajectory depends on (see the module docstring).

    Run caches are keyed by it: keep its output byte-identical (pinned in
    tests/deco_sgd/test_bench_config.py::test_run_fingerprints_are_pinned); e.g. the network
    enters as the round trip (`round_trip_ms`), as when the config's key was `rtt_ms`.
    """
    t = cfg.train
    deco = dict(cfg.deco)
    if spec.kind not in CONTROLLED:
        deco = {k: v for k, v in deco.items() if k not in CONTROLLER_FIELDS}
    key: dict[str, Any] = {
        "v": 1, "task": cfg.task, "workers": cfg.workers, "deco": deco,
        "train": [t.steps, t.lr, t.momentum, t.eval_every, t.compute_time_s],
        "spec": [spec.name, spec.kind, spec.seed, spec.deco, spec.rank],
    }
    if spec.kind in NETWORK_DEPENDENT:
        key["network"] = [cfg.network.round_trip_ms, cfg.network.bandwidth_mbps, cfg.network.trace]
        if spec.kind == "dga":
            key["dga_tau_max"] = cfg.methods.dga_tau_max
        if spec.kind == "static_apriori":
            key["deco_run"] = fingerprint(cfg, RunSpec("deco", "deco", spec.seed))
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _record_path(cache: Path, cfg: BenchConfig, spec: RunSpec) -> Path:
    return cache / f"{spec.key}__{fingerprint(cfg, spec)}.json"


def _load(path: Path) -> dict[str, Any] | None:
    """The record at `path`, or None when it cannot be read (it is then trained again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _worker(rank: int, world: int, cfg: BenchConfig, todo: list[RunSpec], paths: list[str],
            apriori: dict[int, tuple[float, int, str]], progress: bool, code: str) -> None:
    """One rank's share of the plan, run by `ccomm.ranks.run_ranks` (which owns the gloo group)."""
    from .context import RankContext
    from .methods import run_method
    from .tasks import make_task

    logging.basicConfig(level=logging.WARNING)
    task = make_task(cfg.task["name"], **cfg.task_kwargs)
    bar = None
    if rank == 0 and progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * cfg.train.steps, unit="step", desc=cfg.scenario, dynamic_ncols=True)
    ctx = RankContext(rank, world, cfg, task, progress=(bar.update if bar is not None else (lambda k: None)),
                      apriori=dict(apriori))
    for spec, path in zip(todo, paths):
        if bar is not None:
            bar.set_description(f"{cfg.scenario} {spec.key}")
        rec = run_method(ctx, spec)
        # A run's DecoState and its driver reference each other: free the run's model, EF
        # memory and queue now rather than at some later full collection.
        gc.collect()
        if spec.kind == "deco":
            ctx.apriori[spec.seed] = first_decision(rec["decisions"])
        if rank == 0:
            rec["fingerprint"] = fingerprint(cfg, spec)
            rec["code"] = code
            tmp = Path(path).with_suffix(".tmp")
            tmp.write_text(json.dumps(rec))
            os.replace(tmp, path)
    if bar is not None:
        bar.close()


def _spawn(cfg: BenchConfig, todo: list[RunSpec], paths: list[Path], apriori: dict[int, tuple[float, int, str]],
           progress: bool, code: str) -> None:
    t = cfg.train.timeout_s
    try:
        run_ranks(_worker, cfg.workers, cfg, todo, [str(p) for p in paths], apriori, progress, code,
                  timeout=t, group_timeout_s=t)
    except (RankError, TimeoutError) as exc:
        raise BenchFailed(f"train.timeout_s={t:g} s; {exc}") from exc


def _auto_on_this_link(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`steps` with the all-gathers' recorded algorithm dropped, so `replay` charges what
    ``algo="auto"`` picks on the link it replays on (`LinkTimeline.algo`)."""
    return [{**rec, "x": [[item[:2] if item[1] == "allgather" else item for item in chain] for chain in rec["x"]]}
            for rec in steps]


def retime(rec: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    """`rec` with its curve times recomputed on `cfg`'s link from its step log.

    A static run is told its scenario's a-priori link, so its all-gathers run what
    ``algo="auto"`` picks there (`methods`); a cached one may have been trained in another
    scenario. Its trajectory does not depend on the algorithm, so it is charged the algorithm
    it would have run here; for runs trained here that is the recorded one (the runner's
    self-check compares them). Network-dependent runs and ``collective_algo: ring`` keep theirs.
    """
    steps = rec["steps_log"]
    if rec["kind"] not in NETWORK_DEPENDENT and cfg.deco_config().collective_algo == "auto":
        steps = _auto_on_this_link(steps)
    starts = replay(steps, cfg.network.link(), cfg.workers, cfg.train.compute_time_s)
    out = dict(rec)
    out["curve"] = [{**c, "t_s": 0.0 if c["step"] == 0 else starts[c["step"] - 1]} for c in rec["curve"]]
    out["virtual_time_s"] = starts[-1] if starts else 0.0
    return out


def run_bench(cfg: BenchConfig, out_dir: str | Path, *, cache_dir: str | Path | None = None, progress: bool = True,
              echo: Callable[[str], None] = lambda s: None, command: str | None = None) -> dict[str, Any]:
    """Run (or reuse) every run of `cfg` and write DIR/results.json, report.md and plots."""
    from . import report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "runs"
    cache.mkdir(parents=True, exist_ok=True)
    plan = build_plan(cfg)
    paths = [_record_path(cache, cfg, s) for s in plan]
    code = code_digest()
    # Controller-dependent records made by other code are trained again (`provenance`).
    controlled = {s.key: _load(p) for s, p in zip(plan, paths) if s.kind in CONTROLLED and p.exists()}
    stale = [k for k, rec in controlled.items() if rec is None or rec.get("code") != code]
    todo = [(s, p) for s, p in zip(plan, paths) if not p.exists() or s.key in stale]
    apriori: dict[int, tuple[float, int, str]] = {}
    for s in plan:
        rec = controlled.get(s.key)
        if s.kind == "deco" and rec is not None and s.key not in stale:
            apriori[s.seed] = first_decision(rec["decisions"])
    echo(f"{cfg.scenario}: {len(plan)} runs, {len(plan) - len(todo)} reused from {cache}, {len(todo)} to train "
         f"on {cfg.workers} workers" + (f" ({len(stale)} made by other code: {', '.join(stale)})" if stale else ""))
    t0 = time.perf_counter()
    if todo:
        _spawn(cfg, [s for s, _ in todo], [p for _, p in todo], apriori, progress, code)
    wall = time.perf_counter() - t0
    trained = {str(p) for _, p in todo}
    records = []
    for s, p in zip(plan, paths):
        rec = json.loads(p.read_text())
        timed = retime(rec, cfg)
        if str(p) in trained:
            for a, b in zip(rec["curve"], timed["curve"]):
                if not math.isclose(a["t_s"], b["t_s"], rel_tol=1e-9, abs_tol=1e-9):
                    raise BenchFailed(f"{s.key}: replayed time {b['t_s']} != online {a['t_s']} at step {a['step']}")
        timed["reused"] = str(p) not in trained
        records.append(timed)
    results = report.build_results(cfg, records, wall_s=wall, code=code)
    report.write_outputs(results, out, command)
    return results
