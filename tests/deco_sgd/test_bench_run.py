"""End-to-end `deco-sgd bench` on a tiny scenario: schema, progress, determinism, and the real --quick."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from deco_sgd.bench.config import config_from_dict, load_config
from deco_sgd.bench.provenance import code_digest
from deco_sgd.bench.runner import run_bench

pytestmark = pytest.mark.multiprocess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "deco_sgd"

TINY = {
    "scenario": "high_latency",
    "workers": 2,
    "task": {"name": "mnist", "hidden": [32]},
    "network": {"latency_ms": 75, "bandwidth_mbps": 20},
    "train": {"steps": 16, "eval_every": 4, "lr": 0.1, "seeds": [0], "compute_time_s": 0.05, "timeout_s": 300},
    "methods": {"grid_pairs": [[0.1, 1]], "powersgd_ranks": [1], "skip": ["cocktail", "dga", "static_apriori"]},
    # As in the example scenarios: measurements every 2 steps, first informed decision at step 8.
    "deco": {"warmup_steps": 8, "measure_every": 2, "decide_every": 4, "min_dwell_steps": 2,
             "bw_min_transfer_frac": 0.05},
}


def _strip(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("timing", "generated_at")}


def test_tiny_bench_schema_progress_and_determinism(tmp_path: Path) -> None:
    cfg = config_from_dict(TINY)
    a = run_bench(cfg, tmp_path / "a", progress=False)
    assert a["schema"] == 1 and a["mode"] == "virtual" and a["task"] == "mnist"
    assert set(a["target"]) >= {"metric", "value", "rule"}
    assert {"dsgd", "deco", "static_d0.1_t1", "best_static", "powersgd_r1"} <= set(a["methods"])
    for name, m in a["methods"].items():
        assert set(m) >= {"time_to_target_s", "final_metric", "speedup_vs_dsgd", "per_seed", "params", "curve",
                          "decisions"}, name
        curve = m["curve"]
        assert [c["step"] for c in curve] == [0, 4, 8, 12, 16]
        assert all(b["t_s"] > a_["t_s"] for a_, b in zip(curve, curve[1:])), name  # virtual time moves
        assert m["final_metric"] > curve[0]["metric"] + 0.05, f"{name} made no progress"
    assert a["methods"]["dsgd"]["time_to_target_s"] is not None  # D-SGD reaches its own target
    decisions = a["methods"]["deco"]["decisions"]
    assert decisions and decisions[0]["step"] == 8, "the adaptive run logged no decision at the end of warm-up"
    # Estimates come from virtual timestamps: near exact here (constant link, RTT 150 ms, 20 Mbit/s).
    assert decisions[0]["bandwidth_mbps_est"] == pytest.approx(20.0, rel=1e-3)  # L̂ includes the probe bytes
    assert not any(d["reason"].endswith("fallback") for d in decisions)
    assert set(a["methods"]["deco"]["decisions"][0]) >= {"t_s", "step", "ratio", "staleness", "bandwidth_mbps_est",
                                                         "latency_ms_est", "bandwidth_mbps_true", "reason"}
    for f in ("results.json", "report.md", "metric_vs_time.png", "decisions.png", "bandwidth.png"):
        assert (tmp_path / "a" / f).stat().st_size > 0, f
    assert "| dsgd |" in (tmp_path / "a" / "report.md").read_text()
    # A second, independent run (no shared cache) gives identical results apart from timing.
    b = run_bench(cfg, tmp_path / "b", progress=False)
    assert json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)
    # Reusing the cache re-times the stored runs and gives the same results again.
    c = run_bench(cfg, tmp_path / "c", cache_dir=tmp_path / "a" / "runs", progress=False)
    assert all(r["reused"] for r in c["timing"]["runs"].values())
    assert json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(c), sort_keys=True)
    assert a["provenance"] == {"code": code_digest(), "runs": 4, "other_code": {}}
    # Records made by other code: DeCo-SGD's is trained again (a controller change must never
    # be judged on old runs), a static one is reused and the report says it came from other code.
    runs = tmp_path / "a" / "runs"
    for key in ("deco__s0", "dsgd__s0"):
        (path,) = runs.glob(key + "__*.json")
        rec = json.loads(path.read_text())
        path.write_text(json.dumps({**rec, "code": "0123456789abcdef"}))
    d = run_bench(cfg, tmp_path / "d", cache_dir=runs, progress=False)
    assert {k: r["reused"] for k, r in d["timing"]["runs"].items()} == {
        "deco__s0": False, "dsgd__s0": True, "static_d0.1_t1__s0": True, "powersgd_r1__s0": True}
    assert d["provenance"]["other_code"] == {"0123456789abcdef": ["dsgd:s0"]}
    assert "reused runs from other code, by digest: 0123456789abcdef (1 runs: dsgd:s0)" in (
        tmp_path / "d" / "report.md").read_text()
    assert json.loads(next(runs.glob("deco__s0__*.json")).read_text())["code"] == code_digest()
    assert a["methods"]["deco"] == d["methods"]["deco"]  # retrained by the same code: the same run


def test_default_deco_decides_within_six_steps(tmp_path: Path) -> None:
    # Issue 14, item 3: compressed from step 0 (no warm-up), B̂ from the compressed exchanges
    # of the first steps (they wait for the first latency probe instead of being dropped),
    # and the first decision before the monitor has a reference (judged on rises only).
    cfg = config_from_dict({**TINY, "deco": {}, "train": {**TINY["train"], "steps": 12},
                            "methods": {"grid_pairs": [[0.1, 1]], "skip": ["grid", "cocktail", "dga", "static_apriori",
                                                                           "powersgd"]}})
    res = run_bench(cfg, tmp_path / "d", progress=False)
    decisions = res["methods"]["deco"]["decisions"]
    first = next(d for d in decisions if d["bandwidth_mbps_est"] is not None)
    assert first["step"] <= 6 and not first["reason"].endswith(("no_reference", "unknown_bandwidth")), decisions
    # This tiny model's δ = 0.01 payloads are latency-dominated on a 150 ms RTT link: B̂ is
    # the lower bound V/(min_transfer_frac·duration), below the true 20 Mbit/s but known.
    assert 0.0 < first["bandwidth_mbps_est"] <= 20.0 * 1.001
    assert res["methods"]["deco"]["params"]["ratio"] == 0.01  # the adaptive default start


@pytest.mark.slow
def test_real_quick_run(tmp_path: Path) -> None:
    """The `make demo` command: --quick on varying_bandwidth; meant to finish in minutes
    (docs/design/deco_sgd.md#quick-mode)."""
    cfg = load_config(EXAMPLES / "varying_bandwidth.yaml", quick=True)
    t0 = time.monotonic()
    res = run_bench(cfg, tmp_path, progress=False)
    elapsed = time.monotonic() - t0
    assert res["quick"] and res["config"]["workers"] == 4
    expected = {"dsgd", "deco", "static_apriori", "cocktail", "dga", "powersgd_r1", "best_static",
                "static_d0.01_t0", "static_d0.01_t2", "static_d0.001_t4"}
    assert expected <= set(res["methods"])
    for name, m in res["methods"].items():
        assert math.isfinite(m["final_metric"]) and m["final_metric"] > m["curve"][0]["metric"], name
    print(f"quick run took {elapsed:.0f} s")


class _NanAfter:
    """A task whose loss turns NaN from step `start` on (a diverging run, made deterministic)."""

    def __init__(self, task, start: int) -> None:
        self._task, self._start, self._calls = task, start, 0
        self.name, self.higher_is_better, self.device = task.name, task.higher_is_better, task.device

    def __getattr__(self, name):  # model, batches, evaluate, env
        return getattr(self._task, name)

    def loss(self, model, batch):
        self._calls += 1
        loss = self._task.loss(model, batch)
        return loss * float("nan") if self._calls >= self._start else loss


def _diverge_then_train(rank: int, world: int, cfg_dict: dict) -> tuple[dict, dict]:
    from deco_sgd.bench.context import RankContext
    from deco_sgd.bench.methods import run_method
    from deco_sgd.bench.plan import build_plan
    from deco_sgd.bench.tasks import make_task

    cfg = config_from_dict(cfg_dict)
    plan = {s.key: s for s in build_plan(cfg)}
    task = make_task(cfg.task["name"], **cfg.task_kwargs)
    bad = run_method(RankContext(rank, world, cfg, _NanAfter(task, start=4)), plan["static_d0.1_t1__s0"])
    good = run_method(RankContext(rank, world, cfg, task), plan["dsgd__s0"])  # the group still works
    return bad, good


def test_a_diverging_run_is_recorded_and_the_bench_goes_on() -> None:
    from ccomm.ranks import run_ranks

    cfg = {**TINY, "train": {**TINY["train"], "steps": 24}}
    for bad, good in run_ranks(_diverge_then_train, 2, cfg, timeout=300.0):
        # Gradients are NaN from step 4; with tau = 1 their aggregates come due (and are skipped)
        # from step 5, and the 11th skip in a row (max_consecutive_skips = 10) stops the run.
        assert bad["diverged_at_step"] == 15
        assert bad["curve"][-1]["step"] == 15
        assert all(c["metric"] is None or math.isfinite(c["metric"]) for c in bad["curve"])  # rank 0 evaluates
        assert good["diverged_at_step"] is None and good["curve"][-1]["step"] == 24


def test_holdout_reach_is_judged_seed_by_seed() -> None:
    """Medians over seeds hid a miss: on the bytelm varying-bandwidth hold-out D-SGD reached
    the target on seeds 0 and 2, DeCo-SGD on seeds 0 and 1; both medians exist."""
    from deco_sgd.bench.report import _check_targets

    def meth(times: list[float | None]) -> dict:
        ok = sorted(t for t in times if t is not None)
        return {"time_to_target_s": ok[len(ok) // 2] if len(ok) * 2 > len(times) else None, "final_metric": 3.7,
                "per_seed": [{"seed": s, "time_to_target_s": t} for s, t in enumerate(times)],
                "final_vs_dsgd": None}

    methods = {"dsgd": meth([227.1, None, 227.1]), "deco": meth([31.9, 35.9, None]), "best_static": meth([33.2, 36.3, 36.3])}
    reach = _check_targets("holdout_bytelm_varying_bandwidth", methods, False)[0]
    assert reach["what"] == "deco reaches the target wherever dsgd does"
    assert reach["met"] is False and reach["seeds_missed"] == [2]
    methods["deco"] = meth([31.9, None, 30.0])  # misses only where D-SGD missed too
    assert _check_targets("holdout_bytelm_varying_bandwidth", methods, False)[0]["met"] is True


def test_report_compares_deco_with_its_first_decision_frozen_from_step_0() -> None:
    from deco_sgd.bench.report import adaptation_line

    def meth(times: list[float | None], median: float | None) -> dict:
        return {"time_to_target_s": median, "per_seed": [{"seed": s, "time_to_target_s": t} for s, t in enumerate(times)]}

    line = adaptation_line(meth([20.4, 19.8, 19.7], 19.8), meth([16.6, 13.8, 15.3], 15.3))
    assert "deco vs static_apriori 0.77x" in line
    assert "deco 20.4 / 19.8 / 19.7; static_apriori 16.6 / 13.8 / 15.3" in line
    assert "n/a" in adaptation_line(meth([None, None, 20.0], None), meth([16.6, 13.8, 15.3], 15.3))
    assert "never / never / 20.0" in adaptation_line(meth([None, None, 20.0], None), meth([1.0], 1.0))
