"""Time model, τ_min, surrogate, search and decision policy of the controller, with plain numbers."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deco_sgd.config import DecoConfig
from deco_sgd.controller import Controller, Measurements
from deco_sgd.phi import phi_value
from deco_sgd.surrogate import SurrogateParams, fit_surrogate, iterations
from deco_sgd.timemodel import (
    kept_elements,
    message_size,
    pattern_for,
    powersgd_size,
    t_iter,
    tau_min,
)
from netsim import Link, cost

NUMELS = (784 * 1024, 1024, 1024 * 1024, 1024, 10240, 10)  # the MNIST MLP, about 1.86 M parameters
D = sum(NUMELS)
MBIT = 1e6 / 8  # bytes/s per Mbit/s


def TCfg(**kw: object) -> DecoConfig:
    """The template surrogate (docs/design/deco_sgd.md#template-surrogate) with fp32 values and the old
    periods: the tests below check that path; the measured, task-agnostic default has its own tests (test_deco_safety.py)."""
    base = {"convergence": "template", "value_formats": ("fp32",), "ratio": 1.0, "measure_every": 10,
            "decide_every": 100, "min_dwell_steps": 50, "monitor": False, "collective_algo": "ring"}
    return DecoConfig(**{**base, **kw})  # type: ignore[arg-type]


def meas(
    t_comp: float = 0.1, mbps: float | None = 100.0, rtt_ms: float = 50.0, n: int = 8, r: float | None = 1.0
) -> Measurements:
    """Measurements of a ring with one-way latency rtt/2: L_eff = hops·ℓ as a tiny collective would show."""
    ell = rtt_ms / 2e3
    return Measurements(t_comp, None if mbps is None else mbps * MBIT, 2 * (n - 1) * ell, (n - 1) * ell, r)


# -- message sizes (docs/design/deco_sgd.md#message-sizes) ------------------------------------------
def test_message_sizes_match_the_table() -> None:
    n, numels = 4, (10, 1000)
    assert kept_elements(numels, 0.01) == 1 + 10  # ⌈0.1⌉ = 1 of 10, ⌈10⌉ = 10 of 1000
    assert kept_elements(numels, 1.0) == 1010
    dense = message_size("allreduce_dense", n, numels, 0.01)
    assert (dense.nbytes, dense.latency_hops) == (2 * 3 / 4 * 1010 * 4, 6)
    sparse = message_size("allreduce_sparse", n, numels, 0.01)
    assert (sparse.nbytes, sparse.latency_hops) == (2 * 3 / 4 * 11 * 4, 6)
    gather = message_size("allgather", n, numels, 0.01, value_bytes=2)
    assert (gather.nbytes, gather.latency_hops) == (3 * 11 * (2 + 4), 3)
    ps = message_size("ps", n, numels, 0.01)
    assert (ps.nbytes, ps.latency_hops) == (11 * 8 + min(4 * 11 * 8, 1010 * 4), 2)
    ps_full = message_size("ps", n, numels, 0.5)  # pull capped by the dense model
    assert ps_full.nbytes == kept_elements(numels, 0.5) * 8 + 1010 * 4
    psgd = powersgd_size(n, [(100, 50), (50,), (3, 2, 2)], rank=4)
    assert (psgd.nbytes, psgd.latency_hops) == (2 * 3 / 4 * 4 * (4 * 150 + 50 + 3 * 7), 12)
    assert message_size("allgather", 1, numels, 0.1).nbytes == 0.0


def test_dsgd_step_time_is_compute_plus_allreduce() -> None:
    # δ = 1, τ = 0: T_comp + L_eff + T_tx(1), and the communication part equals netsim's ring all-reduce.
    n, mbps, lat_ms, t_comp = 8, 100.0, 75.0, 0.1
    size = message_size(pattern_for("allgather", 1.0), n, NUMELS, 1.0)
    assert size.nbytes == pytest.approx(2 * 7 / 8 * D * 4)
    l_eff = size.latency_hops * lat_ms / 1e3
    t = t_iter(t_comp, size.nbytes / (mbps * MBIT), l_eff, 0)
    by_hand = 0.1 + 14 * 0.075 + 2 * 7 / 8 * D * 4 / 12.5e6
    assert t == pytest.approx(by_hand, rel=1e-12)
    link = Link(bandwidth_mbps=mbps, latency_ms=lat_ms)
    assert t - t_comp == pytest.approx(cost.allreduce_time(D * 4, link, n=n), rel=1e-9)


def test_step_time_floor_and_pipelining() -> None:
    assert t_iter(0.1, 0.05, 0.3, 0) == pytest.approx(0.45)
    assert t_iter(0.1, 0.05, 0.3, 2) == pytest.approx(0.15)
    assert t_iter(0.1, 0.05, 0.3, 10) == 0.1  # compute-bound floor
    assert t_iter(0.1, 1.0, 0.5, 10) == 1.0  # bandwidth-bound floor: one message per step
    assert t_iter(0.1, math.inf, 0.5, 3) == math.inf
    with pytest.raises(ValueError, match="^t_comp:"):
        t_iter(0.0, 0.1, 0.1, 0)


# -- τ_min (docs/design/deco_sgd.md#least-staleness) -----------------------------------------------
@pytest.mark.parametrize(
    "t_comp,t_tx,l_eff,expected",
    [
        (0.1, 0.05, 0.3, 4),  # (0.1 + 0.35)/0.1 = 4.5 → ⌈4.5⌉ − 1 = 4
        (0.1, 0.1, 0.2, 3),  # (0.1 + 0.3)/0.1 = 4 exactly (up to rounding) → 3, not 4
        (0.1, 1.0, 0.5, 1),  # bandwidth-bound: (0.1 + 1.5)/1.0 = 1.6 → 1
        (0.1, 0.0, 0.0, 0),  # no communication
        (0.05, 0.01, 1.05, 22),  # high latency: ⌈1.06/0.05⌉ = 22 (≥ τ_max 16: capped by the caller)
        (0.1, math.inf, 0.1, 0),  # no bandwidth
    ],
)
def test_tau_min_worked_by_hand(t_comp: float, t_tx: float, l_eff: float, expected: int) -> None:
    assert tau_min(t_comp, t_tx, l_eff) == expected


@given(
    t_comp=st.floats(1e-3, 1.0),
    t_tx=st.floats(0.0, 2.0),
    l_eff=st.floats(0.0, 2.0),
)
def test_tau_min_is_the_least_staleness_reaching_the_floor(t_comp: float, t_tx: float, l_eff: float) -> None:
    tm = tau_min(t_comp, t_tx, l_eff)
    floor = max(t_comp, t_tx)
    assert t_iter(t_comp, t_tx, l_eff, tm) == pytest.approx(floor, rel=1e-8)
    if tm > 0:
        assert t_iter(t_comp, t_tx, l_eff, tm - 1) > floor * (1 + 1e-10)
    if t_tx <= t_comp:  # the shortcut ⌈T_comm/T_comp⌉ of docs/design/deco_sgd.md#least-staleness
        x = (l_eff + t_tx) / t_comp
        if abs(x - round(x)) > 1e-6:
            assert tm == math.ceil(x)


# -- surrogate (docs/design/deco_sgd.md#template-surrogate) ----------------------------------------
def test_phi_functions_by_hand() -> None:
    assert phi_value("exp2", 0.5, 3) == pytest.approx(1.0 * 8)
    assert phi_value("exp2", 0.5, 3, base=3.0) == pytest.approx(27)
    assert phi_value("exp2", 1.0, 5) == 0.0
    assert phi_value("poly", 0.5, 2) == pytest.approx(0.5 / 0.25 * 4)
    assert phi_value("reported", 0.5, 2) == pytest.approx(0.5 ** (1 - 2) / 0.5)
    assert phi_value("reported", 1.0, 0) == 0.0


def test_reported_phi_nan_and_its_guard() -> None:
    # (1−δ)/(δ(1−δ)^τ) is 0/0 at δ = 1 for τ ≥ 1, tends to 1 at τ = 1 and diverges for τ ≥ 2.
    assert math.isnan(phi_value("reported", 1.0, 1)) and math.isnan(phi_value("reported", 1.0, 2))
    assert phi_value("reported", 0.999999, 1) == pytest.approx(1.0, rel=1e-5)
    assert phi_value("reported", 0.999, 3) == pytest.approx(0.001**-2 / 0.999)
    p = SurrogateParams(phi="reported")
    assert math.isnan(iterations(p, 1.0, 1, 1.0, 8))
    # Guard 1: the config refuses `reported` unless every grid ratio is ≤ 0.5.
    with pytest.raises(ValueError, match="^phi:"):
        DecoConfig(phi="reported")
    # Guard 2: a NaN N is never a candidate nor a "better" current point. The run starts
    # dense (ratio 1, here with τ = 1), whose score is NaN: it must count as +inf.
    cfg = TCfg(phi="reported", ratio_grid=(0.5, 0.1), staleness=1, warmup_steps=0)
    ctl = Controller(cfg, 8, NUMELS)
    m = meas()
    assert ctl.score(m, 1.0, 1).w == math.inf
    dec = ctl.decide(m, (1.0, 1), step=0)
    assert dec.outcome == "switch" and dec.ratio in (0.5, 0.1) and dec.w_current == math.inf
    assert math.isfinite(dec.w)  # type: ignore[arg-type]


def test_surrogate_by_hand() -> None:
    p = SurrogateParams(a=1, b=2, c=3, kappa=0.5, eps_rel=0.25, phi="exp2")
    # a·r/(nε²) + b·sqrt(τ² + κΦ)/ε^1.5 + c(τ+1)/ε with Φ = (1−δ)/δ·2^τ = 1·4 at δ = .5, τ = 2
    expected = 2.0 / (4 * 0.0625) + 2 * math.sqrt(4 + 0.5 * 4) / 0.125 + 3 * 3 / 0.25
    assert iterations(p, 0.5, 2, r=2.0, n=4) == pytest.approx(expected)


def _synthetic(p: SurrogateParams, scale: float, noise: float, r: float, n: int) -> list[tuple[float, int, float]]:
    rng = np.random.default_rng(1234)
    return [
        (d, t, scale * iterations(p, d, t, r, n) * (math.exp(rng.normal(0.0, noise)) if noise else 1.0))
        for d in (1.0, 0.1, 0.01, 0.001)
        for t in (0, 1, 2, 4, 8)
    ]


def test_fit_surrogate_recovers_known_parameters() -> None:
    true = SurrogateParams(b=0.3, kappa=0.05)
    fit = fit_surrogate(_synthetic(true, 7.0, 0.0, 0.5, 8), SurrogateParams(), r=0.5, n=8)
    assert (fit.b, fit.kappa, fit.scale) == pytest.approx((0.3, 0.05, 7.0), rel=1e-6)
    assert fit.rms_log_error < 1e-9 and fit.n_samples == 20
    noisy = fit_surrogate(_synthetic(true, 7.0, 0.05, 0.5, 8), DecoConfig(), r=0.5, n=8)
    assert noisy.b == pytest.approx(0.3, rel=0.15) and noisy.kappa == pytest.approx(0.05, rel=0.25)
    assert 0.02 < noisy.rms_log_error < 0.08  # the injected noise is 0.05 in log space
    cfg = noisy.apply(DecoConfig())
    assert (cfg.b, cfg.kappa) == (noisy.b, noisy.kappa)


def test_fit_surrogate_rejects_unusable_samples() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit_surrogate([(0.1, 0, 10.0)], SurrogateParams(), r=1.0, n=2)
    with pytest.raises(ValueError, match="not identifiable"):
        fit_surrogate([(1.0, t, 10.0 + t) for t in range(4)], SurrogateParams(), r=1.0, n=2)
    with pytest.raises(ValueError, match="not finite"):
        fit_surrogate([(1.0, 1, 10.0), (0.1, 0, 5.0), (0.1, 1, 6.0)], SurrogateParams(phi="reported"), r=1.0, n=2)


# -- search (docs/design/deco_sgd.md#search) ------------------------------------------------------------
def _brute_force(ctl: Controller, m: Measurements, cfg: DecoConfig) -> tuple[float, int, float]:
    """Independent argmin: every grid point and τ ≤ min(τ_min, τ_max), ties as
    docs/design/deco_sgd.md#search says."""
    p = SurrogateParams.from_config(cfg)
    r = 0.0 if m.r is None else m.r
    rows = []
    for d in cfg.ratio_grid:
        pat = pattern_for(cfg.exchange_pattern, d)
        # The real payload: dense values + one-hot trailer, or the codec's bytes + trailer.
        if pat == "allreduce_dense":
            op, per_rank = "allreduce", (D + ctl.n) * 4
        else:
            codec = cfg.make_codec(d)
            per_rank = sum(codec.nbytes(torch.Size([x]), torch.float32) for x in NUMELS)
            op = "allreduce" if pat == "allreduce_sparse" else "allgather"
            per_rank += ctl.n * 4 if op == "allreduce" else 1
        steps = cost.schedule(op, ctl.n, float(per_rank), "ring")
        received = sum(b for st_ in steps for (_s, dst, b) in st_ if dst == 0)
        lat = m.latency_allgather if pat == "allgather" else m.latency_allreduce
        t_tx = received / m.bandwidth  # type: ignore[operator]
        for t in range(min(tau_min(m.t_comp, t_tx, lat), cfg.tau_max) + 1):  # type: ignore[arg-type]
            w = iterations(p, d, t, r, ctl.n) * t_iter(m.t_comp, t_tx, lat, t)  # type: ignore[arg-type]
            rows.append((w, -d, t))
    w, negd, t = min(rows)
    return -negd, t, w


@pytest.mark.parametrize("mbps,rtt_ms", [(100, 150), (5, 50), (50, 50), (1000, 1), (20, 300)])
@pytest.mark.parametrize("b", [1.0, 0.01])
def test_search_matches_brute_force(mbps: float, rtt_ms: float, b: float) -> None:
    cfg = TCfg(b=b, kappa=0.1)
    ctl = Controller(cfg, 8, NUMELS)
    m = meas(mbps=mbps, rtt_ms=rtt_ms, r=4.0)
    best = ctl.search(m)
    assert best is not None
    d, t, w = _brute_force(ctl, m, cfg)
    assert (best.ratio, best.staleness) == (d, t)
    assert best.w == pytest.approx(w, rel=1e-12)


@given(
    t_comp=st.floats(0.005, 1.0),
    mbps=st.floats(1.0, 10_000.0),
    rtt_ms=st.floats(0.0, 400.0),
    r=st.floats(0.0, 100.0),
    b=st.floats(0.001, 2.0),
    kappa=st.floats(0.001, 2.0),
    phi=st.sampled_from(["exp2", "poly"]),
    codec=st.sampled_from(["topk", "randomk"]),
)
def test_search_matches_brute_force_everywhere(
    t_comp: float, mbps: float, rtt_ms: float, r: float, b: float, kappa: float, phi: str, codec: str
) -> None:
    cfg = TCfg(b=b, kappa=kappa, phi=phi, codec=codec)
    ctl = Controller(cfg, 8, NUMELS)
    m = meas(t_comp=t_comp, mbps=mbps, rtt_ms=rtt_ms, r=r)
    best = ctl.search(m)
    assert best is not None
    d, t, w = _brute_force(ctl, m, cfg)
    assert best.w == pytest.approx(w, rel=1e-9)  # same optimum value; the point may differ only by a float tie
    if best.w != pytest.approx(w, rel=1e-15):
        assert (best.ratio, best.staleness) == (d, t)


def test_pattern_for_full_ratio_is_dense() -> None:
    assert pattern_for("allgather", 1.0) == "allreduce_dense"
    assert pattern_for("allreduce", 1.0) == "allreduce_dense"
    assert pattern_for("allgather", 0.5) == "allgather"
    assert pattern_for("allreduce", 0.5) == "allreduce_sparse"


def test_timeout_check_against_the_slowest_exchange(caplog: pytest.LogCaptureFixture) -> None:
    m = meas(mbps=100, rtt_ms=150)
    ctl = Controller(TCfg(timeout_s=10.0), 8, NUMELS)
    # Dense at ratio 1: 14 hops of 75 ms + 2·7/8·D·4 B at 12.5 MB/s ≈ 2.1 s. Top-k at 0.5 is
    # slower: an all-gather moves 7 blocks of the real top-k payload (values + packed
    # indices + the validity byte) ≈ 46 MB, 3.7 s + 7 hops ≈ 4.2 s.
    assert ctl.comm_time(m, 1.0) == pytest.approx(14 * 0.075 + 2 * 7 / 8 * (D + 8) * 4 / 12.5e6)  # + validity one-hot
    worst = max(ctl.comm_time(m, d) for d in ctl.grid)
    block = sum(TCfg().make_codec(0.5).nbytes(torch.Size([x]), torch.float32) for x in NUMELS) + 1
    assert block < kept_elements(NUMELS, 0.5) * 8
    assert worst == pytest.approx(7 * 0.075 + 7 * block / 12.5e6)
    with caplog.at_level(logging.WARNING, logger="deco_sgd.controller"):
        assert not ctl.timeout_ok(m)
    assert "timeout_s=10" in caplog.text
    assert Controller(TCfg(timeout_s=50.0), 8, NUMELS).timeout_ok(m)  # ≥ 10 × 4.2 s
    assert ctl.timeout_ok(meas(mbps=None))  # unknown bandwidth: no verdict


def test_decision_log_entry_is_json() -> None:
    ctl = Controller(TCfg(**CHEAP), 8, NUMELS)  # type: ignore[arg-type]
    entry = ctl.decide(meas(mbps=5), (1.0, 0), step=0).as_dict()
    back = json.loads(json.dumps(entry, allow_nan=False))
    assert back["reason"] == "initial:switch" and back["ratio"] < 1.0 and back["bandwidth"] == 5 * MBIT


# A surrogate where staleness and compression are cheap (noisy gradients: a large r) so that
# the network decides; these are controller tests, not claims about the default constants.
CHEAP = dict(b=0.05, kappa=0.01, c=0.2, warmup_steps=0)


def test_high_latency_gives_high_staleness() -> None:
    ctl_lo = Controller(TCfg(**CHEAP), 8, NUMELS)  # type: ignore[arg-type]
    ctl_hi = Controller(TCfg(**CHEAP), 8, NUMELS)  # type: ignore[arg-type]
    lo = ctl_lo.search(meas(mbps=100, rtt_ms=1, r=10.0))
    hi = ctl_hi.search(meas(mbps=100, rtt_ms=200, r=10.0))
    assert lo is not None and hi is not None
    assert hi.staleness >= 4 and hi.staleness > lo.staleness
    assert hi.t_iter < ctl_hi.score(meas(mbps=100, rtt_ms=200, r=10.0), 1.0, 0).t_iter / 5


def test_low_bandwidth_gives_small_ratio() -> None:
    ctl = Controller(TCfg(**CHEAP), 8, NUMELS)  # type: ignore[arg-type]
    fast = ctl.search(meas(mbps=10_000, rtt_ms=1, r=10.0))
    slow = ctl.search(meas(mbps=5, rtt_ms=1, r=10.0))
    assert fast is not None and slow is not None
    assert fast.ratio == 1.0 and slow.ratio <= 0.01


def test_ties_prefer_larger_ratio_then_smaller_staleness() -> None:
    # c-only surrogate: N = (τ+1)/ε, and below τ_min T_iter = (T_comp + T_comm)/(τ+1), so
    # W is the same for every τ < τ_min; on one worker nothing is sent, so every δ ties too.
    cfg = TCfg(a=0.0, b=0.0, c=1.0, ratio_grid=(0.1, 1.0, 0.5), warmup_steps=0)
    one = Controller(cfg, 1, NUMELS).search(Measurements(0.1, 1e6, 0.0, 0.0, 1.0))
    assert one is not None and (one.ratio, one.staleness) == (1.0, 0)
    ctl = Controller(cfg.replace(ratio_grid=(1.0,)), 8, NUMELS)
    m = Measurements(0.1, 1e12, 0.35, 0.35, 1.0)  # T_comm ≈ 0.35 s: τ_min = 4
    ws = [ctl.score(m, 1.0, t).w for t in range(4)]
    assert max(ws) == pytest.approx(min(ws), rel=1e-9)  # the tie is real
    best = ctl.search(m)
    assert best is not None and (best.ratio, best.staleness) == (1.0, 0)


def test_no_finite_candidate_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    cfg = TCfg(warmup_steps=0)
    for bw in (0.0,):  # a measured outage; an unknown (None, NaN) B̂ holds instead (next test)
        ctl = Controller(cfg, 8, NUMELS)
        with caplog.at_level(logging.WARNING, logger="deco_sgd.controller"):
            dec = ctl.decide(meas(mbps=bw), (1.0, 0), step=0)
        assert (dec.ratio, dec.staleness, dec.outcome) == (min(cfg.ratio_grid), cfg.tau_max, "fallback")
        assert "no finite candidate" in caplog.text
        caplog.clear()


def test_unmeasured_bandwidth_holds_until_measured() -> None:
    # Unknown B̂ is "not measured yet" (e.g. the first decision after a short warm-up), not an
    # outage: hold the current point and keep the trigger armed for the next call.
    for bw in (None, float("nan")):  # Measurements turns a non-finite number into None
        ctl = Controller(TCfg(warmup_steps=0), 8, NUMELS)
        dec = ctl.decide(meas(mbps=bw), (1.0, 0), step=0)
        assert (dec.ratio, dec.staleness, dec.outcome, dec.changed) == (1.0, 0, "unknown_bandwidth", False)
    dec = ctl.decide(meas(mbps=100.0), (1.0, 0), step=1)
    assert dec.trigger == "initial" and dec.outcome in ("switch", "optimal")


def test_unknown_latency_holds_instead_of_falling_back() -> None:
    ctl = Controller(TCfg(warmup_steps=0, ratio_grid=(0.1, 0.01)), 8, NUMELS)
    m = Measurements(0.1, 1e7, 0.3, None, 1.0)  # top-k below ratio 1 needs the all-gather latency
    assert ctl.search(m) is None
    dec = ctl.decide(m, (1.0, 0), step=0)
    assert (dec.outcome, dec.changed) == ("unknown_latency", False)
    dec = ctl.decide(Measurements(0.1, 1e7, 0.3, 0.15, 1.0), (1.0, 0), step=10)
    assert dec.trigger == "initial" and dec.outcome in ("switch", "hysteresis", "optimal")


# -- policy (docs/design/deco_sgd.md#decisions-across-ranks) -----------------------------------------------
def test_warmup_static_and_unknown_compute_hold() -> None:
    cfg = TCfg(**CHEAP).replace(warmup_steps=20)  # type: ignore[arg-type]
    ctl = Controller(cfg, 8, NUMELS)
    assert ctl.decide(meas(mbps=5), (1.0, 0), step=10).reason == "warmup:hold"
    unknown = ctl.decide(meas(t_comp=float("nan"), mbps=5), (1.0, 0), step=20)
    assert (unknown.reason, unknown.changed) == ("initial:unknown_compute", False)
    assert ctl.decide(meas(mbps=5), (1.0, 0), step=30).reason == "initial:switch"  # still the first decision
    static = Controller(cfg.replace(mode="static"), 8, NUMELS)
    assert static.decide(meas(mbps=5), (1.0, 0), step=30).reason == "static:hold"


def test_triggers_period_and_changes() -> None:
    # No dwell, so every triggered decision is evaluated and becomes the new reference.
    ctl = Controller(TCfg(**CHEAP).replace(min_dwell_steps=0), 8, NUMELS)  # type: ignore[arg-type]
    base = meas(mbps=100, rtt_ms=50)
    d0 = ctl.decide(base, (1.0, 0), step=0)
    cur = (d0.ratio, d0.staleness)
    assert ctl.decide(meas(mbps=115, rtt_ms=55), cur, step=10).trigger == "none"  # 15%, 10%: small
    assert ctl.decide(meas(mbps=None, rtt_ms=50), cur, step=20).trigger == "none"  # unknown never triggers
    assert ctl.decide(meas(mbps=125.1, rtt_ms=50), cur, step=30).trigger == "bandwidth_change"
    assert ctl.decide(meas(mbps=125.1, rtt_ms=70), cur, step=40).trigger == "latency_change"
    assert ctl.decide(meas(mbps=125.1, rtt_ms=70), cur, step=130).trigger == "none"  # 90 steps since 40
    assert ctl.decide(meas(mbps=125.1, rtt_ms=70), cur, step=140).trigger == "period"


def test_hysteresis_holds_a_near_optimal_point() -> None:
    cfg = TCfg(**CHEAP)  # type: ignore[arg-type]
    m = meas(mbps=20, rtt_ms=100, r=10.0)
    ctl = Controller(cfg, 8, NUMELS)
    best = ctl.search(m)
    assert best is not None
    # The runner-up within 5% of the optimum: the default hysteresis band.
    near = [(d, t) for d in cfg.ratio_grid for t in range(cfg.tau_max + 1)
            if (d, t) != (best.ratio, best.staleness) and best.w < ctl.score(m, d, t).w < best.w / 0.95]
    assert near, "precondition: some point lies within the hysteresis band"
    dec = ctl.decide(m, near[0], step=0)
    assert (dec.outcome, dec.changed, (dec.ratio, dec.staleness)) == ("hysteresis", False, near[0])
    no_band = Controller(cfg.replace(hysteresis=0.0), 8, NUMELS).decide(m, near[0], step=0)
    assert (no_band.outcome, no_band.ratio, no_band.staleness) == ("switch", best.ratio, best.staleness)


def test_optimal_current_point_is_kept() -> None:
    ctl = Controller(TCfg(**CHEAP), 8, NUMELS)  # type: ignore[arg-type]
    m = meas(mbps=20, rtt_ms=100, r=10.0)
    best = ctl.search(m)
    assert best is not None
    dec = ctl.decide(m, (best.ratio, best.staleness), step=0)
    assert (dec.outcome, dec.changed, dec.w) == ("optimal", False, best.w)


def test_min_dwell_delays_a_second_switch() -> None:
    ctl = Controller(TCfg(**CHEAP), 8, NUMELS)  # type: ignore[arg-type]
    first = ctl.decide(meas(mbps=10_000, rtt_ms=1, r=10.0), (0.001, 8), step=0)
    assert first.outcome == "switch"
    cur = (first.ratio, first.staleness)
    slow = meas(mbps=5, rtt_ms=150, r=10.0)  # a big change: trigger, and a much better point exists
    held = ctl.decide(slow, cur, step=10)
    assert (held.trigger, held.outcome, held.changed) == ("bandwidth_change", "dwell", False)
    assert ctl.decide(slow, cur, step=40).outcome == "dwell"  # the trigger stays armed
    later = ctl.decide(slow, cur, step=50)  # min_dwell_steps = 50 since the switch at 0
    assert (later.trigger, later.outcome, later.changed) == ("bandwidth_change", "switch", True)


def test_lut_rebuilds_only_on_large_r_moves() -> None:
    ctl = Controller(TCfg(**CHEAP), 8, NUMELS)  # type: ignore[arg-type]
    ctl.search(meas(r=1.0))
    assert ctl.state_dict()["lut_r"] == 1.0
    ctl.search(meas(r=1.09))
    assert ctl.state_dict()["lut_r"] == 1.0
    ctl.search(meas(r=1.11))
    assert ctl.state_dict()["lut_r"] == 1.11
    ctl.search(meas(r=None))  # unknown r counts as 0
    assert ctl.state_dict()["lut_r"] == 0.0


def test_state_dict_round_trip_gives_the_same_decisions() -> None:
    cfg = TCfg(**CHEAP)  # type: ignore[arg-type]
    a = Controller(cfg, 8, NUMELS)
    d0 = a.decide(meas(mbps=10_000, rtt_ms=1), (1.0, 0), step=0)
    sd = json.loads(json.dumps(a.state_dict()))  # JSON-able
    b = Controller(cfg, 8, NUMELS)
    b.load_state_dict(sd)
    cur = (d0.ratio, d0.staleness)
    for step, m in [(10, meas(mbps=5, rtt_ms=150)), (60, meas(mbps=5, rtt_ms=150)), (70, meas(mbps=50))]:
        da, db = a.decide(m, cur, step), b.decide(m, cur, step)
        assert da == db
        cur = (da.ratio, da.staleness)
    with pytest.raises(ValueError, match="world size"):
        Controller(cfg, 4, NUMELS).load_state_dict(sd)
