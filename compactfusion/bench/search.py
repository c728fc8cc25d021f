"""Bandwidth search: the per-rank bandwidth at which uncompressed ring hits a target slowdown.

The paper's Ethernet point has ``T_ring,none / T_single = 136.52 / 28.06 = 4.87``
(docs/design/compactfusion.md#our-benchmark). The time per image is close to affine in the
inverse bandwidth, ``T(B) ≈ T_inf + W / B`` (``W`` = bytes each rank sends per image), so the
search works in ``x = 1 / B``:

1. start at ``B0 = W / (slowdown · T_single − T_inf)`` (the affine model's answer);
2. measure ``T(B_k)``; stop when ``|T(B_k) / (slowdown · T_single) − 1| ≤ tolerance``;
3. otherwise take the secant step in ``x`` through the last two points (the first step uses
   ``(0, T_inf)`` as the earlier point) and repeat, at most ``max_steps`` times;
4. return the measured point closest to the target.

If ``slowdown · T_single ≤ T_inf`` (even an infinite link is too slow), no bandwidth reaches the
target: the result is flagged and the bandwidth at which communication doubles ``T_inf`` is
returned, so the rest of the run still has a shaped point.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

from ccomm.validate import check_number

__all__ = ["SearchResult", "secant_bandwidth"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    """The chosen bandwidth and every measured ``(B, T)`` point (B in bytes/s)."""

    bandwidth_Bps: float
    time_s: float
    target_s: float
    history: tuple[tuple[float, float], ...]
    converged: bool
    reachable: bool

    @property
    def slowdown_error(self) -> float:
        """Relative miss of the target slowdown (measured / target − 1)."""
        return self.time_s / self.target_s - 1.0


def secant_bandwidth(
    measure: Callable[[float], float],
    *,
    t_single: float,
    t_inf: float,
    bytes_per_rank: float,
    slowdown: float = 4.87,
    tolerance: float = 0.10,
    max_steps: int = 3,
) -> SearchResult:
    """Search ``B`` (bytes/s) with ``measure(B) ≈ slowdown · t_single``; see the module docstring."""
    for name, v in (("t_single", t_single), ("t_inf", t_inf), ("bytes_per_rank", bytes_per_rank)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: must be finite and > 0, got {v!r}")
    check_number("slowdown", slowdown, 1.0, lo_open=True)
    target = slowdown * t_single
    if target <= t_inf:
        b = bytes_per_rank / t_inf
        logger.warning("bandwidth search: T_inf=%.3f s already exceeds the target %.3f s; using B=%.3g B/s", t_inf, target, b)
        t = measure(b)
        return SearchResult(b, t, target, ((b, t),), False, False)
    x_prev, t_prev = 0.0, t_inf
    x = (target - t_inf) / bytes_per_rank
    history: list[tuple[float, float]] = []
    for k in range(max_steps + 1):
        t = measure(1.0 / x)
        history.append((1.0 / x, t))
        logger.info("bandwidth search step %d: B=%.4g B/s T=%.4f s (target %.4f s)", k, 1.0 / x, t, target)
        if abs(t / target - 1.0) <= tolerance or k == max_steps:
            break
        slope = (t - t_prev) / (x - x_prev) if x != x_prev else 0.0
        if not slope > 0:  # noise made T non-increasing in 1/B: fall back to the affine model through this point
            slope = max((t - t_inf) / x, 1e-12)
        x_next = x + (target - t) / slope
        x_prev, t_prev = x, t
        x = x_next if x_next > 0 else x / 2
    b, t = min(history, key=lambda p: abs(p[1] / target - 1.0))
    return SearchResult(b, t, target, tuple(history), abs(t / target - 1.0) <= tolerance, True)
