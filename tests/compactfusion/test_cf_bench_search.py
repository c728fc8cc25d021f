"""compactfusion.bench.search: the secant search on synthetic latency curves."""
from __future__ import annotations

import math

import pytest

from compactfusion.bench.search import secant_bandwidth


def _curve(t_inf: float, w: float, bend: float = 0.0):
    calls: list[float] = []

    def measure(b: float) -> float:
        calls.append(b)
        return t_inf + w / b + bend * (w / b) ** 2  # bend > 0: not affine in 1/B, so the first guess misses

    return measure, calls


def test_affine_curve_hits_target_at_the_first_guess() -> None:
    measure, calls = _curve(0.5, 10e6)
    r = secant_bandwidth(measure, t_single=1.0, t_inf=0.5, bytes_per_rank=10e6, slowdown=4.87)
    assert len(calls) == 1 and r.converged and r.reachable
    assert r.bandwidth_Bps == pytest.approx(10e6 / (4.87 - 0.5))
    assert r.time_s == pytest.approx(4.87)


@pytest.mark.parametrize("bend", [0.05, 0.2, -0.03])
def test_nonlinear_curve_converges_within_tolerance(bend: float) -> None:
    measure, calls = _curve(0.5, 10e6, bend)
    r = secant_bandwidth(measure, t_single=1.0, t_inf=0.5, bytes_per_rank=10e6, slowdown=4.87, tolerance=0.02, max_steps=3)
    assert r.converged, r.history
    assert abs(r.time_s / 4.87 - 1) <= 0.02
    assert len(calls) <= 4 and len(r.history) == len(calls)
    first = r.history[0]
    assert abs(first[1] / 4.87 - 1) > 0.02  # the search had work to do


def test_step_budget_is_respected_and_best_point_returned() -> None:
    measure, calls = _curve(0.5, 10e6, 1.0)
    r = secant_bandwidth(measure, t_single=1.0, t_inf=0.5, bytes_per_rank=10e6, slowdown=4.87, tolerance=1e-6, max_steps=1)
    assert len(calls) == 2 and not r.converged
    assert abs(r.slowdown_error) == min(abs(t / 4.87 - 1) for _, t in r.history)


def test_unreachable_target_is_flagged() -> None:
    measure, calls = _curve(6.0, 10e6)
    r = secant_bandwidth(measure, t_single=1.0, t_inf=6.0, bytes_per_rank=10e6, slowdown=4.87)
    assert not r.reachable and not r.converged and len(calls) == 1
    assert r.bandwidth_Bps == pytest.approx(10e6 / 6.0)


def test_noisy_non_increasing_probe_does_not_break_the_search() -> None:
    seq = iter([0.4, 4.9, 4.9, 4.9])  # first probe faster than T_inf (noise)
    r = secant_bandwidth(lambda b: next(seq), t_single=1.0, t_inf=0.5, bytes_per_rank=1e6, slowdown=4.87, max_steps=3)
    assert all(math.isfinite(b) and b > 0 for b, _ in r.history)
    assert r.converged


@pytest.mark.parametrize("kw", [{"t_single": 0.0}, {"t_inf": -1.0}, {"bytes_per_rank": math.nan}, {"slowdown": 1.0}])
def test_bad_arguments(kw: dict) -> None:
    args = {"t_single": 1.0, "t_inf": 0.5, "bytes_per_rank": 1e6, "slowdown": 4.87} | kw
    with pytest.raises(ValueError, match=next(iter(kw))):
        secant_bandwidth(lambda b: 1.0, **args)
