"""tests/_timing.py: runs are judged only when the host kept up, retried, then skipped."""
from __future__ import annotations

import time

import pytest

from _timing import HostLag, on_time


def _busy(seconds: float) -> None:
    """Hold the GIL in pure Python: the lag thread cannot run until the interpreter switches."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_host_lag_sees_a_stall() -> None:
    with HostLag() as lag:
        _busy(0.05)  # the switch interval (5 ms) is the least it waits for the GIL
    assert lag.wakeups >= 1
    assert lag.max_s >= 2e-3


def test_first_on_time_run_is_returned_and_late_runs_are_not() -> None:
    lates = iter([2, 1, 0, 0])
    calls = []

    def run() -> int:
        calls.append(1)
        return next(lates)

    assert on_time(run, lambda late: late, lag_limit_s=float("inf"), attempts=3) == 0
    assert len(calls) == 3


def test_never_on_time_skips_with_the_numbers() -> None:
    runs = []
    with pytest.raises(pytest.skip.Exception, match=r"never kept up in 2 runs.*run 1: 3 late events.*"
                                                    r"run 2: 3 late events.*load average"):
        on_time(lambda: runs.append(1) or 3, lambda late: late, lag_limit_s=float("inf"), attempts=2)
    assert len(runs) == 2
    # Lag alone also makes a run unjudgeable; setup runs before every attempt.
    setups = []
    with pytest.raises(pytest.skip.Exception, match=r"lag limit 0\.001 ms.*max scheduling lag"):
        on_time(lambda: _busy(0.05), lag_limit_s=1e-6, attempts=2, setup=lambda: setups.append(1))
    assert len(setups) == 2



def test_a_timeout_is_no_verdict_only_when_the_host_lagged() -> None:
    def stalled() -> None:
        _busy(0.05)
        raise TimeoutError("ranks [0] did not finish within 1 s")

    with pytest.raises(pytest.skip.Exception, match=r"run 2: timed out \(ranks \[0\] did not finish"):
        on_time(stalled, lag_limit_s=1e-6, attempts=2)
    with pytest.raises(TimeoutError):  # the host kept up: the timeout is the test's failure
        on_time(stalled, lag_limit_s=float("inf"))
