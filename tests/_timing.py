"""Wall-clock tests judged only on runs in which the host kept up (marker ``timing``).

A test that compares measured time with a model or a bound measures the machine as much as
the code when the host is overloaded: a rank descheduled for a few milliseconds, or a link
emulator whose real transport overran the model, moves the measurement by exactly that much.
Such a run says nothing about the code, so it is neither passed nor failed:

1. The test hands :func:`on_time` a ``run`` callable that returns the measurements (no
   assertions inside) and a ``late`` callable that counts what the run itself saw go late,
   e.g. ``emu.stats.late_ops`` summed over the ranks, or the TUN wire's bottleneck flag.
2. While ``run`` executes, a :class:`HostLag` thread in this process sleeps ``PERIOD_S`` at a
   time and records how much later than asked it wakes up: the scheduling lag every sleeping
   thread on the host sees, ranks included (one process per rank, so no GIL is shared).
3. A run with no late event and a maximal lag within ``lag_limit_s`` is returned and the test
   judges it with its unchanged tolerances: a model that disagrees still fails.
4. Otherwise the run is repeated, ``attempts`` runs in all; if the host never kept up the test
   is skipped with the numbers (late events, maximal lag, load average) of every attempt. A
   run that raises ``TimeoutError`` (a rank pool's deadline) counts as not kept up only when
   the lag exceeded the limit too; otherwise the error is the test's failure.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

__all__ = ["ATTEMPTS", "LAG_LIMIT_S", "PERIOD_S", "HostLag", "on_time", "wire_late"]

T = TypeVar("T")

#: Runs per test before it is skipped as unjudgeable.
ATTEMPTS = 3
#: Default largest scheduling lag of a judged run: half the emulator's 2 ms absolute tolerance.
LAG_LIMIT_S = 1e-3
#: The lag probe's sleep; short enough to see a stall of a few milliseconds anywhere in the run.
PERIOD_S = 1e-3


class HostLag:
    """Context manager: the largest wake-up lag of a thread sleeping ``PERIOD_S`` at a time."""

    __slots__ = ("max_s", "wakeups", "_stop", "_thread")

    def __init__(self) -> None:
        self.max_s = 0.0
        self.wakeups = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="timing-host-lag", daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            due = time.monotonic() + PERIOD_S
            time.sleep(PERIOD_S)
            self.max_s = max(self.max_s, time.monotonic() - due)
            self.wakeups += 1

    def __enter__(self) -> HostLag:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def on_time(run: Callable[[], T], late: Callable[[T], float] = lambda _: 0, *,
            lag_limit_s: float = LAG_LIMIT_S, attempts: int = ATTEMPTS,
            setup: Callable[[], object] | None = None) -> T:
    """The result of the first of ``attempts`` runs the host kept up with; else ``pytest.skip``.

    ``late(result)`` counts the run's own late events (0 when it has none to report).
    ``setup()`` runs before each attempt, outside the watched window: starting processes is
    the test's own CPU load, not a measurement.
    """
    seen = []
    for k in range(attempts):
        if setup is not None:
            setup()
        try:
            with HostLag() as lag:
                result = run()
        except TimeoutError as exc:
            # A deadline missed while the host stalled longer than the limit is no verdict
            # either; on a host that kept up it is the test's failure.
            if lag.max_s <= lag_limit_s:
                raise
            seen.append(f"run {k + 1}: timed out ({str(exc).splitlines()[0]}), "
                        f"max scheduling lag {lag.max_s * 1e3:.1f} ms")
            continue
        n_late = late(result)
        if not n_late and lag.max_s <= lag_limit_s:
            return result
        seen.append(f"run {k + 1}: {n_late:g} late events, max scheduling lag {lag.max_s * 1e3:.1f} ms")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    pytest.skip(f"the host never kept up in {attempts} runs (lag limit {lag_limit_s * 1e3:g} ms): "
                f"{'; '.join(seen)}; load average {load}")


def wire_late(rep: object) -> float:
    """A netsim probe report's late events: 1 when its TUN wire says it was the bottleneck
    (over 1 % of packets more than 1 ms late, i.e. the host did not keep up), else 0."""
    wire = getattr(rep, "wire", None)
    return float(bool(wire and wire["bottleneck"]))
