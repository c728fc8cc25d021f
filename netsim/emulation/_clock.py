"""The two clocks of ``netsim.emulate``: emulation seconds since the agreed t0.

:class:`EmuWallClock` reads CLOCK_MONOTONIC and really sleeps. :class:`EmuVirtualClock` never
sleeps: it moves by the wall time that passes *outside* emulate's own calls (the caller's
compute), by :meth:`EmuVirtualClock.compute`, and to the due time of every awaited operation.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["EmuClock", "EmuWallClock", "EmuVirtualClock"]


# Below this remaining time sleeping again overshoots more than it helps; the 2 ms accuracy
# budget absorbs the rest.
_MIN_SLEEP_S = 50e-6


class EmuClock(Protocol):
    virtual: bool

    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...

    def settle(self) -> None: ...


class EmuWallClock:
    """Seconds since ``t0`` on ``time.monotonic`` (``t0`` in this process's monotonic time)."""

    virtual = False

    def __init__(self, t0: float) -> None:
        self.t0 = t0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sleep_until(self, t: float) -> None:
        # time.sleep can return early on some kernels and by design stops short below; loop.
        while True:
            left = t - self.now()
            if left <= _MIN_SLEEP_S:
                return
            time.sleep(left)

    def settle(self) -> None:
        """Nothing to do: wall time needs no bookkeeping."""


class EmuVirtualClock:
    """A per-rank virtual clock, thread-safe.

    Until :meth:`compute` is first called, the wall time elapsed between emulate calls is
    added (the caller's real compute). From then on only ``compute`` and communication move
    the clock, so runs are deterministic whatever the machine load.
    """

    virtual = True

    def __init__(self) -> None:
        self._t = 0.0
        self._mark = time.monotonic()
        self._explicit = False
        self._lock = threading.Lock()

    def _observe(self) -> None:
        m = time.monotonic()
        if not self._explicit:
            self._t += max(0.0, m - self._mark)
        self._mark = m

    def now(self) -> float:
        with self._lock:
            self._observe()
            return self._t

    def compute(self, seconds: float) -> None:
        """Declare the compute since the last emulate call to be ``seconds``.

        The wall time of that interval is dropped, so a run whose compute is all declared
        is deterministic from the emulate entry on."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        with self._lock:
            self._mark = time.monotonic()
            self._explicit = True
            self._t += seconds

    def advance_to(self, t: float) -> None:
        with self._lock:
            self._observe()
            self._t = max(self._t, t)

    def sleep_until(self, t: float) -> None:
        self.advance_to(t)
        self.settle()

    def settle(self) -> None:
        """Restart the wall-time mark: time spent inside emulate is not the caller's compute."""
        with self._lock:
            self._mark = time.monotonic()
