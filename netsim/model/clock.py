"""Clocks: virtual time that moves only when told to, and wall time with a calibrated sleep.

:class:`WallClock` paces real-time runs (DeCo-SGD's real-time mode); :class:`VirtualClock`
is the same interface for code that must not sleep. In-process emulation has its own clocks,
agreed across ranks (:mod:`netsim.emulation._clock`).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Protocol

__all__ = ["CALIBRATION_SLEEPS", "CALIBRATION_SLEEP_S", "Clock", "VirtualClock", "WallClock"]

logger = logging.getLogger(__name__)

#: One-ms sleeps WallClock times to learn its oversleep (the wire uses the same recipe).
CALIBRATION_SLEEPS = 50
CALIBRATION_SLEEP_S = 1e-3


# ---------------------------------------------------------------------------- clocks
class Clock(Protocol):
    @property
    def now(self) -> float: ...
    def advance(self, dt: float) -> None: ...
    def advance_to(self, t: float) -> None: ...
    def sleep(self, dt: float) -> None: ...
    def sleep_until(self, t: float) -> None: ...


class VirtualClock:
    """Time that moves only when told to."""

    def __init__(self, start_s: float = 0.0) -> None:
        if not (math.isfinite(start_s) and start_s >= 0):
            raise ValueError(f"start_s={start_s!r} must be finite and >= 0")
        self._now = float(start_s)

    @property
    def now(self) -> float:
        return self._now

    def advance(self, dt: float) -> None:
        if not (math.isfinite(dt) and dt >= 0):
            raise ValueError(f"dt={dt!r} must be finite and >= 0")
        self._now += dt

    def advance_to(self, t: float) -> None:
        if not (math.isfinite(t) and t >= self._now):
            raise ValueError(f"t={t!r} must be finite and >= now={self._now!r}")
        self._now = float(t)

    def sleep(self, dt: float) -> None:
        self.advance(dt)

    def sleep_until(self, t: float) -> None:
        """Like ``advance_to`` but a time already past is a no-op (as for a real clock)."""
        if t > self._now:
            self.advance_to(t)


class WallClock:
    """``time.monotonic`` with a calibrated ``sleep_until``: sleep to ``t - bias``, then spin.

    ``bias`` is the median oversleep of short sleeps, measured once on first use."""

    def __init__(self, bias_s: float | None = None) -> None:
        if bias_s is not None and not (math.isfinite(bias_s) and bias_s >= 0):
            raise ValueError(f"bias_s={bias_s!r} must be finite and >= 0")
        self._bias = bias_s

    @property
    def now(self) -> float:
        return time.monotonic()

    @property
    def bias_s(self) -> float:
        if self._bias is None:
            over = []
            for _ in range(CALIBRATION_SLEEPS):
                t0 = time.monotonic()
                time.sleep(CALIBRATION_SLEEP_S)
                over.append(time.monotonic() - t0 - CALIBRATION_SLEEP_S)
            self._bias = max(0.0, statistics.median(over))
            logger.debug("WallClock sleep bias %.3f ms", self._bias * 1e3)
        return self._bias

    def sleep_until(self, t: float) -> float:
        """Return at or just after monotonic time t; returns the lateness in seconds."""
        remaining = t - time.monotonic()
        if remaining > self.bias_s:
            time.sleep(remaining - self.bias_s)
        while time.monotonic() < t:
            time.sleep(0)  # yield the core while spinning the last fraction of a millisecond
        return time.monotonic() - t

    def sleep(self, dt: float) -> None:
        if not (math.isfinite(dt) and dt >= 0):
            raise ValueError(f"dt={dt!r} must be finite and >= 0")
        self.sleep_until(time.monotonic() + dt)

    def advance(self, dt: float) -> None:
        self.sleep(dt)

    def advance_to(self, t: float) -> None:
        self.sleep_until(t)
