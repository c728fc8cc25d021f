"""Estimators on synthetic timelines: queueing, latency-dominated and bad samples, EMAs
(docs/design/deco_sgd.md#estimators)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deco_sgd.estimators import (
    BandwidthEstimator,
    ComputeTimeEstimator,
    Ema,
    GradStatsEstimator,
    LatencyEstimator,
    sampled_sq_norm,
    shared_coords,
)

#: Relative error allowed for statistical estimates over a few hundred seeded steps.
STAT_RTOL = 0.05


def link_timeline(launches: list[float], nbytes: float, bw: float, lat: float) -> list[tuple[float, float]]:
    """(launch, done) of messages on one FIFO link, charged as the virtual clock does
    (docs/design/deco_sgd.md#virtual-time)."""
    free, out = 0.0, []
    for t in launches:
        tx_start = max(t, free)
        done = tx_start + lat + nbytes / bw
        free = done - lat
        out.append((t, done))
    return out


def test_bandwidth_exact_without_queueing() -> None:
    est = BandwidthEstimator()
    for t0, t1 in link_timeline([1.0 * i for i in range(5)], 100_000, 1e6, 0.05):
        assert est.update(100_000, t0, t1, latency=0.05)
    assert est.value == pytest.approx(1e6, rel=1e-9)


def test_bandwidth_queueing_correction() -> None:
    # Launched every 20 ms, each message needs 100 ms of wire time: a growing queue.
    tl = link_timeline([0.02 * i for i in range(30)], 100_000, 1e6, 0.05)
    naive = [100_000 / (t1 - t0 - 0.05) for t0, t1 in tl]
    assert min(naive) < 0.2e6  # the queue is real: the naive rate is far off
    est = BandwidthEstimator()
    for t0, t1 in tl:
        assert est.update(100_000, t0, t1, latency=0.05)
    assert est.value == pytest.approx(1e6, rel=1e-9)
    assert est.filtered == 0  # backlog samples are the precise ones: none is dropped


def test_bandwidth_filters_latency_dominated_exchanges() -> None:
    est = BandwidthEstimator(min_transfer_frac=0.25)
    # 100 bytes at 1 MB/s behind 50 ms of latency: the transfer is 0.2% of the duration.
    assert not est.update(100, 0.0, 0.0501, latency=0.05)
    assert est.value is None and est.filtered == 1
    # 20 kB: 20 ms of 70 ms is 29% ≥ 25%: kept.
    assert est.update(20_000, 1.0, 1.07, latency=0.05)
    assert est.value == pytest.approx(1e6)


def test_bandwidth_unknown_samples_change_nothing() -> None:
    est = BandwidthEstimator()
    assert est.update(100_000, 0.0, 0.15, latency=0.05)
    before = est.state_dict()
    for args in [(0, 1.0, 1.2), (-5, 1.0, 1.2), (float("nan"), 1.0, 1.2), (100_000, 2.0, 2.0),
                 (100_000, 2.0, 1.9), (100_000, float("inf"), 3.0), (100_000, 0.5, 0.1)]:
        assert not est.update(*args, latency=0.05)  # type: ignore[arg-type]
    assert est.value == before["ema"]["value"]
    assert est.ema.rejected == 7


def test_bandwidth_ema_tracks_a_step_change() -> None:
    est = BandwidthEstimator(alpha=0.3)
    t = 0.0
    for bw in [1e6] * 3 + [2e6] * 4:
        assert est.update(100_000, t, t + 0.05 + 100_000 / bw, latency=0.05)
        t += 1.0
    # Seeded with the first sample, then value += α(x − value): 2e6 − 1e6·0.7⁴ after four 2 MB/s samples.
    assert est.value == pytest.approx(2e6 - 1e6 * 0.7**4, rel=1e-12)


def test_latency_min_filter_and_window() -> None:
    est = LatencyEstimator(window=5)
    assert est.value("allreduce") is None
    rng = np.random.default_rng(0)
    for spike in rng.uniform(0.0, 0.2, size=4):
        est.update("allreduce", 0.03 + spike)  # queueing only ever adds delay
    est.update("allreduce", 0.03)
    assert est.value("allreduce") == 0.03
    assert not est.update("allreduce", 0.0) and not est.update("allreduce", -1.0)
    assert not est.update("allreduce", float("nan"))
    assert est.rejected == 3 and est.value("allreduce") == 0.03
    for _ in range(5):
        est.update("allreduce", 0.05)  # the old minimum slides out of the window
    assert est.value("allreduce") == 0.05
    assert est.value("allgather") is None  # patterns are separate


def test_compute_time_ema() -> None:
    est = ComputeTimeEstimator(alpha=0.1)
    assert est.update(0.30, blocked_s=0.10)
    assert est.value == pytest.approx(0.20)
    assert est.update(0.40, blocked_s=0.10)
    assert est.value == pytest.approx(0.20 + 0.1 * (0.30 - 0.20))
    assert not est.update(0.10, blocked_s=0.20)  # negative compute time
    assert not est.update(float("nan"))
    assert not est.update(0.3, blocked_s=-1.0)
    assert est.value == pytest.approx(0.21) and est.ema.rejected == 3


def test_ema_rejects_bad_alpha() -> None:
    with pytest.raises(ValueError, match="^alpha:"):
        Ema(0.0)
    with pytest.raises(ValueError, match="^alpha:"):
        Ema(1.5)


def test_grad_stats_recover_sigma_and_g2() -> None:
    # g_i = μ + s·ξ_i: E mean_i‖g_i‖² = ‖μ‖² + d s², and
    # σ² = n/(n−1)·(mean‖g_i‖² − ‖ḡ‖²) is unbiased for d s².
    rng = np.random.default_rng(42)
    n, d, s = 4, 500, 0.1
    mu = rng.normal(size=d)
    est = GradStatsEstimator(n, alpha=0.02)
    for _ in range(400):
        g = mu + s * rng.normal(size=(n, d))
        est.update(float(np.mean(np.sum(g * g, axis=1))), float(np.sum(g.mean(0) ** 2)))
    assert est.sigma2.value == pytest.approx(d * s * s, rel=STAT_RTOL)
    assert est.g2.value == pytest.approx(mu @ mu + d * s * s, rel=STAT_RTOL)
    assert est.r == pytest.approx(d * s * s / (mu @ mu + d * s * s), rel=2 * STAT_RTOL)


def test_grad_stats_clamp_unknown_and_single_worker() -> None:
    est = GradStatsEstimator(2)
    est.update(1.0, 1.5)  # sampled ‖ḡ‖² can exceed the mean norm: σ² clamps to 0, not negative
    assert est.sigma2.value == 0.0 and est.r == 0.0
    est.update(float("nan"), 0.5)  # unknown G² sample: nothing moves
    est.update(2.0, -1.0)  # bad ‖ḡ‖²: G² moves, σ² does not
    assert est.g2.count == 2 and est.sigma2.count == 1 and est.sigma2.rejected == 1
    solo = GradStatsEstimator(1)
    solo.update(1.0, 1.0)
    assert solo.g2.value == 1.0 and solo.r is None  # σ² needs two workers


def test_shared_coords_are_shared_and_fresh() -> None:
    a = shared_coords(10_000, 64, seed=3, step=7)
    assert np.array_equal(a, shared_coords(10_000, 64, seed=3, step=7))  # every rank draws the same
    assert not np.array_equal(a, shared_coords(10_000, 64, seed=3, step=8))
    assert a.size == 64 and np.all(np.diff(a) > 0) and a.max() < 10_000
    assert np.array_equal(shared_coords(5, 64, seed=0, step=0), np.arange(5))


def test_sampled_norm_is_exact_on_all_coordinates_and_unbiased() -> None:
    rng = np.random.default_rng(7)
    n, d, s = 3, 2000, 256
    g = rng.normal(size=(n, d)) + np.linspace(-1, 1, d)
    exact = float(np.sum(g.mean(0) ** 2))
    assert sampled_sq_norm(g.sum(0), n, d) == pytest.approx(exact)
    est = [sampled_sq_norm(g[:, shared_coords(d, s, 0, t)].sum(0), n, d) for t in range(300)]
    assert float(np.mean(est)) == pytest.approx(exact, rel=STAT_RTOL)


def test_state_dicts_round_trip() -> None:
    bw, lat, comp, gs = BandwidthEstimator(), LatencyEstimator(4), ComputeTimeEstimator(), GradStatsEstimator(4)
    bw.update(1e5, 0.0, 0.2, 0.05)
    lat.update("allgather", 0.02)
    comp.update(0.1)
    gs.update(3.0, 1.0)
    for obj, fresh, feed in [
        (bw, BandwidthEstimator(), lambda e: e.update(1e5, 1.0, 1.3, 0.05)),
        (lat, LatencyEstimator(4), lambda e: e.update("allgather", 0.03)),
        (comp, ComputeTimeEstimator(), lambda e: e.update(0.2)),
        (gs, GradStatsEstimator(4), lambda e: e.update(2.0, 0.5)),
    ]:
        fresh.load_state_dict(json.loads(json.dumps(obj.state_dict())))  # type: ignore[attr-defined]
        feed(obj)
        feed(fresh)
        assert fresh.state_dict() == obj.state_dict()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="workers"):
        GradStatsEstimator(2).load_state_dict(gs.state_dict())
    with pytest.raises(ValueError, match="window"):
        LatencyEstimator(5).load_state_dict(lat.state_dict())
    assert math.isfinite(bw.value or math.nan)


def test_bandwidth_estimator_restarts_on_a_step_change() -> None:
    from deco_sgd.estimators import BandwidthEstimator

    b = BandwidthEstimator(alpha=0.3, min_transfer_frac=0.0)
    t = 0.0
    for _ in range(5):  # 10 MB/s: 1 MB in 0.1 s, one after the other
        b.update(1e6, t, t + 0.1)
        t += 0.1
    assert b.value == pytest.approx(1e7)
    b.update(1e6, t, t + 1.0)  # one slow sample: the EMA moves, no restart yet
    t += 1.0
    assert 1e6 < b.value < 1e7  # type: ignore[operator]
    b.update(1e6, t, t + 1.0)  # a second one in a row, still > 2x off: restart at 1 MB/s
    assert b.value == pytest.approx(1e6)
    b2 = BandwidthEstimator(alpha=0.3, min_transfer_frac=0.0)
    b2.load_state_dict(b.state_dict())
    assert b2.value == b.value


def test_bandwidth_lower_bound_when_every_exchange_is_latency_bound() -> None:
    from deco_sgd.estimators import LOWER_BOUND_AFTER, BandwidthEstimator

    b = BandwidthEstimator(alpha=0.3, min_transfer_frac=0.25)
    t = 0.0
    for i in range(LOWER_BOUND_AFTER):
        assert b.value is None
        b.update(1000.0, t, t + 0.5, latency=0.49)  # 10 ms of transfer in 0.5 s: filtered
        t += 0.5
    # The transfer took under a quarter of the 0.5 s (that is why it was filtered): B is at
    # least bytes / (0.25 · 0.5 s), still below the true 1000 B / 10 ms.
    assert b.value == pytest.approx(1000.0 / (0.25 * 0.5))
    assert 1000.0 / 0.5 < b.value < 1000.0 / 0.01
    b.update(1e6, t, t + 1.0, latency=0.1)  # a real sample takes over
    assert b.value == pytest.approx(1e6 / 0.9)


def test_bandwidth_is_settled_only_after_several_samples_of_one_ema() -> None:
    """A lower bound and the first samples of an EMA (new or restarted on a step change) are
    not settled: the controller reads a move from them as the estimate refining."""
    from deco_sgd.estimators import LOWER_BOUND_AFTER, SETTLED_SAMPLES, BandwidthEstimator

    b = BandwidthEstimator(alpha=0.3, min_transfer_frac=0.25)
    t = 0.0
    for _ in range(LOWER_BOUND_AFTER):
        b.update(1000.0, t, t + 0.5, latency=0.49)  # latency-bound: filtered
        t += 0.5
    assert b.value is not None and not b.settled  # the lower bound
    for i in range(SETTLED_SAMPLES):
        assert not b.settled, i
        b.update(1e6, t, t + 0.1)  # 10 MB/s
        t += 0.1
    assert b.settled and b.value == pytest.approx(1e7)
    for _ in range(2):  # two samples 10x slower in a row: the EMA restarts, young again
        b.update(1e6, t, t + 1.0)
        t += 1.0
    assert b.value == pytest.approx(1e6) and not b.settled
    b2 = BandwidthEstimator(alpha=0.3, min_transfer_frac=0.25)
    b2.load_state_dict(b.state_dict())
    assert not b2.settled
    for _ in range(SETTLED_SAMPLES - 1):
        b2.update(1e6, t, t + 1.0)
        t += 1.0
    assert b2.settled
    # A checkpoint from before the count: the EMA it holds counts as settled.
    old = {k: v for k, v in b2.state_dict().items() if k != "since_seed"}
    b3 = BandwidthEstimator()
    b3.load_state_dict(old)
    assert b3.settled
