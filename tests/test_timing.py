"""tests/_timing.py: runs are judged only when the host kept up, retried, then skipped."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import _timing
from _timing import LAG_LIMIT_S, STALL_LIMIT_S, HostLag, cpu_stall_s, on_time


@pytest.fixture(autouse=True)
def _no_psi(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's real CPU stall must not decide these tests: without PSI unless a test fakes it."""
    monkeypatch.setattr(_timing, "cpu_stall_s", lambda: None)


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


class _FakePsi:
    """A PSI reader whose host stalls ``stalls[k]`` seconds at once in window ``k``: the
    window's first reading (HostLag entering) is before the stall, every later one after.
    ``next_run`` (an ``on_time`` setup) moves to the next window."""

    def __init__(self, stalls: list[float]) -> None:
        self._stalls = stalls
        self._k = -1
        self._total = 100.0
        self._first = True

    def next_run(self) -> None:
        self._k += 1
        self._first = True

    def __call__(self) -> float:
        if self._first:
            self._first = False
            self._total += self._stalls[self._k]
            return self._total - self._stalls[self._k]
        return self._total


def test_host_lag_reports_the_stall_of_its_window() -> None:
    psi = _FakePsi([0.004])
    psi.next_run()
    with HostLag(stall_reader=psi) as lag:
        time.sleep(0.01)
    assert lag.stall_s == pytest.approx(0.004)
    assert lag.peak_stall_s == pytest.approx(0.004)
    assert lag.window_s >= 0.01
    with HostLag(stall_reader=lambda: None) as lag:  # no PSI: no stall, not a zero stall
        pass
    assert lag.stall_s is None and lag.peak_stall_s is None


def test_peak_stall_is_the_most_within_the_stall_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # Driven by hand on a fake clock (no probe thread): a reading every 30 ms for 1.2 s, 1 ms
    # of stall before each, and one 6 ms burst. The peak is what about 100 ms holds: the
    # stall since the last reading at least 100 ms old (4 readings), not the run's 46 ms.
    now = [0.0]
    monkeypatch.setattr(_timing, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=time.sleep))
    total = [50.0]
    lag = HostLag(stall_reader=lambda: total[0])
    lag._begin()
    for k in range(1, 41):
        now[0] = k * 0.03
        total[0] += 1e-3 + (6e-3 if k == 20 else 0.0)
        lag._sample()
    assert lag.peak_stall_s == pytest.approx(0.004 + 0.006)
    # A probe descheduled for longer than the window: the stall of that gap still counts.
    now[0] += 0.5
    total[0] += 0.3
    lag._sample()
    assert lag.peak_stall_s == pytest.approx(0.3)


def test_cpu_stall_reads_the_some_total(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text("some avg10=0.54 avg60=2.79 avg300=20.46 total=38936761975\n"
                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert cpu_stall_s(str(psi)) == pytest.approx(38936.761975)
    assert cpu_stall_s(str(tmp_path / "missing")) is None  # a kernel without PSI
    psi.write_text("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert cpu_stall_s(str(psi)) is None


def test_a_stalled_run_is_repeated_then_skipped_with_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    psi = _FakePsi([0.0031, 0.0042])
    monkeypatch.setattr(_timing, "cpu_stall_s", psi)
    runs = []
    with pytest.raises(pytest.skip.Exception,
                       match=r"lag limit inf ms, stall limit 2 ms\): run 1: 0 late events, "
                             r"max scheduling lag "
                             r"[0-9.]+ ms, max CPU stall 3\.1 ms in 100 ms \(3\.1 ms in the run's \d+ ms\); "
                             r"run 2: .*max CPU stall 4\.2 ms in 100 ms.*; load average"):
        on_time(lambda: runs.append(1), lag_limit_s=float("inf"), stall_limit_s=2e-3, attempts=2,
                setup=psi.next_run)
    assert len(runs) == 2


def test_a_run_within_the_stall_limit_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    psi = _FakePsi([0.005, 0.0019, 0.0])
    monkeypatch.setattr(_timing, "cpu_stall_s", psi)
    runs: list[int] = []
    assert on_time(lambda: runs.append(1) or len(runs), lag_limit_s=float("inf"), stall_limit_s=2e-3,
                   setup=psi.next_run) == 2
    assert len(runs) == 2


def test_the_stall_limit_defaults_to_its_share_of_the_lag_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _timing._stall_limit(LAG_LIMIT_S, None) == STALL_LIMIT_S
    assert _timing._stall_limit(0.2, None) == pytest.approx(0.2 / LAG_LIMIT_S * STALL_LIMIT_S)
    assert _timing._stall_limit(0.2, 1e-3) == 1e-3  # a limit the test gives is used as given
    # The default reaches the verdict and the skip reason.
    psi = _FakePsi([300.0, 50.0])  # a lag limit (5 s) no host misses: only the stall (100 s) decides
    monkeypatch.setattr(_timing, "cpu_stall_s", psi)
    runs: list[int] = []
    assert on_time(lambda: runs.append(1) or len(runs), lag_limit_s=LAG_LIMIT_S * 100 / STALL_LIMIT_S,
                   setup=psi.next_run) == 2
    psi = _FakePsi([STALL_LIMIT_S + 5e-3])
    monkeypatch.setattr(_timing, "cpu_stall_s", psi)
    with pytest.raises(pytest.skip.Exception,
                       match=rf"lag limit 1 ms, stall limit {STALL_LIMIT_S * 1e3:g} ms\)"):
        on_time(lambda: None, attempts=1, setup=psi.next_run)


def test_without_psi_the_lag_alone_judges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_timing, "cpu_stall_s", lambda: None)
    # Even a zero stall limit cannot skip a run whose stall is unknown ...
    assert on_time(lambda: 7, lag_limit_s=float("inf"), stall_limit_s=0.0) == 7
    # ... and the skip reason then has no stall to report.
    with pytest.raises(pytest.skip.Exception) as skip:
        on_time(lambda: 7, lambda _: 1, stall_limit_s=0.0, attempts=1)
    assert "CPU stall" not in str(skip.value)


def test_a_timeout_in_a_stalled_run_is_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    def hung() -> None:
        raise TimeoutError("ranks [0, 1] did not finish within 2 s")

    psi = _FakePsi([0.5])
    monkeypatch.setattr(_timing, "cpu_stall_s", psi)
    with pytest.raises(pytest.skip.Exception,
                       match=r"run 1: timed out \(ranks \[0, 1\].*max CPU stall 500\.0 ms"):
        on_time(hung, lag_limit_s=float("inf"), stall_limit_s=2e-3, attempts=1, setup=psi.next_run)
    psi = _FakePsi([0.001])
    monkeypatch.setattr(_timing, "cpu_stall_s", psi)
    with pytest.raises(TimeoutError):  # within both limits: the timeout is the test's failure
        on_time(hung, lag_limit_s=float("inf"), stall_limit_s=2e-3, attempts=1, setup=psi.next_run)
