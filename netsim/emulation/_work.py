"""Work handles of ``netsim.emulate``: a real torch Work that completes at max(real, modeled).

Each emulated operation is an :class:`EmuOp` whose due time (emulation seconds) is fixed
when the operation is issued, computed either by the emulator's resolver thread (sends and
collectives, in issue order) or lazily from the sender's header (receives). An
:class:`EmulatedWork` wraps the real Work: ``wait`` is the real wait then a sleep to the due
time, and ``get_future`` is completed by one :class:`Timer` thread once both have happened.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ._clock import EmuClock

__all__ = ["EmuOp", "EmulatedWork", "Timer", "WorkHost"]

logger = logging.getLogger(__name__)


class EmuOp:
    """One emulated operation: what it is, when it was issued and, once known, its due time."""

    def __init__(self, kind: str, nbytes: float, issued_s: float) -> None:
        self.kind = kind
        self.nbytes = nbytes
        self.issued_s = issued_s
        self.due_s: float | None = None
        self.error: BaseException | None = None
        self._event = threading.Event()
        self._lazy: Callable[[float | None], float] | None = None
        self._lazy_lock = threading.Lock()
        self.lazy_ready: Callable[[], bool] | None = None
        self.late_noted = False  # counted once in emu.stats.late_ops, whichever real part was late

    def set_lazy(self, resolve: Callable[[float | None], float], ready: Callable[[], bool]) -> None:
        """Resolve on demand (receives): ``resolve(timeout_s)`` gives the due time, ``ready()``
        says whether it can do so without blocking."""
        self._lazy = resolve
        self.lazy_ready = ready

    def set_due(self, due_s: float) -> None:
        self.due_s = due_s
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._event.set()

    @property
    def resolved(self) -> bool:
        return self._event.is_set()

    def try_resolve(self) -> bool:
        """Resolve without blocking if possible; True when the due time is known."""
        ready = self.lazy_ready
        if not self._event.is_set() and ready is not None and ready():
            self.resolve(None)
        return self._event.is_set()

    def resolve(self, timeout_s: float | None) -> float:
        """Block until the due time is known (or raise the failure that prevented it)."""
        if self._lazy is not None and not self._event.is_set():
            with self._lazy_lock:
                if not self._event.is_set():
                    try:
                        self.set_due(self._lazy(timeout_s))
                    except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                        self.fail(exc)
                    # The closures reference the work that references this op: break the
                    # cycle so the garbage collector has less to do mid-run.
                    self._lazy = self.lazy_ready = None
        if not self._event.wait(timeout_s):
            raise TimeoutError(f"emulated {self.kind}: no due time after {timeout_s} s (is a peer gone?)")
        if self.error is not None:
            raise RuntimeError(f"emulated {self.kind} failed: {self.error}") from self.error
        assert self.due_s is not None
        return self.due_s


def _timeout_s(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        secs = timeout.total_seconds()
        return None if secs <= 0 else secs  # torch's kNoTimeout is a zero timedelta
    return float(timeout)


class WorkHost(Protocol):
    """What a work handle and the :class:`Timer` need of the engine that issued them.

    :class:`netsim.emulation.Emulator` provides it; the handles never see the rest of it.
    """

    clock: EmuClock
    timeout_s: float
    timer: Timer

    def note_real_done(self, op: EmuOp, t: float) -> None:
        """The real transport of ``op`` finished at emulation time ``t`` (counts late ops)."""
        ...


class EmulatedWork(dist.Work):
    """A ``torch.distributed.Work`` completing at max(real completion, modeled due time)."""

    def __init__(self, inner: dist.Work | None, op: EmuOp, emu: WorkHost, value: Any = None) -> None:
        super().__init__()
        self.inner = inner
        self.op = op
        self._emu = emu
        self._value = value  # what the future yields when the real work has no future
        self._done = False
        self._inner_lock = threading.Lock()
        self._inner_waited = inner is None

    def wait_inner(self, timeout_s: float) -> None:
        """Wait for the real work once: gloo's point-to-point work hangs if waited twice."""
        with self._inner_lock:
            if self._inner_waited:
                return
            assert self.inner is not None
            pending = not self.inner.is_completed()
            self.inner.wait(timedelta(seconds=timeout_s))
            self._inner_waited = True
            if pending:
                self._emu.note_real_done(self.op, self._emu.clock.now())

    def wait(self, timeout: Any = None) -> bool:
        secs = _timeout_s(timeout)
        if secs is None:
            secs = self._emu.timeout_s
        # A due time still unknown when we start waiting comes from emulation's own real
        # messages (metadata gathers, p2p headers); learning it after it passed is late too.
        unresolved = not self.op.resolved
        due = self.op.resolve(secs)
        if unresolved:
            self._emu.note_real_done(self.op, self._emu.clock.now())
        self.wait_inner(secs)
        self._emu.clock.sleep_until(due)
        self._emu.clock.settle()
        self._done = True
        return True

    def is_completed(self) -> bool:
        if self._done:
            return True
        if self.inner is not None and not self.inner.is_completed():
            return False
        if not self.op.try_resolve():
            return False
        clock = self._emu.clock
        assert self.op.due_s is not None
        if clock.virtual:
            # A virtual clock only moves when asked; a successful poll moves it to the due time.
            clock.sleep_until(self.op.due_s)
        elif clock.now() < self.op.due_s:
            return False
        self._done = True
        return True

    def is_success(self) -> bool:
        return self.is_completed() and self.op.error is None

    def exception(self) -> Any:
        return self.inner.exception() if self.inner is not None else None

    def source_rank(self) -> int:
        return self.inner.source_rank() if self.inner is not None else -1

    def _source_rank(self) -> int:
        return self.inner._source_rank() if self.inner is not None else -1

    def result(self) -> list[torch.Tensor]:
        return self.inner.result() if self.inner is not None else []

    def synchronize(self) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        return self._emu.timer.watch(self)


class Timer:
    """Completes futures at their due time from one thread, in (due, issue) order."""

    def __init__(self, emu: WorkHost) -> None:
        self._emu = emu
        self._heap: list[tuple[float, int, torch.futures.Future, Any, BaseException | None]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="netsim-emulate-timer", daemon=True)
        self._thread.start()

    def watch(self, work: EmulatedWork) -> torch.futures.Future:
        """A future of ``work`` that completes after the real work and the due time."""
        fut: torch.futures.Future = torch.futures.Future()
        t = threading.Thread(target=self._await, args=(work, fut), name="netsim-emulate-watch", daemon=True)
        t.start()
        return fut

    def _await(self, work: EmulatedWork, fut: torch.futures.Future) -> None:
        emu = self._emu
        try:
            due = work.op.resolve(emu.timeout_s)
            value = work._value
            inner_fut = None
            if work.inner is not None and work.op.kind not in ("send", "recv"):
                inner_fut = work.inner.get_future()
            if inner_fut is not None:
                value = inner_fut.wait()
                emu.note_real_done(work.op, emu.clock.now())
            else:
                work.wait_inner(emu.timeout_s)
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            self._push(0.0, fut, None, exc)
            return
        self._push(due, fut, value, None)

    def _push(self, due: float, fut: torch.futures.Future, value: Any, exc: BaseException | None) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._seq), fut, value, exc))
            self._cond.notify()

    def _run(self) -> None:
        clock = self._emu.clock
        while True:
            with self._cond:
                while not self._stop and not self._heap:
                    self._cond.wait()
                if self._stop and not self._heap:
                    return
                due = self._heap[0][0]
                if not clock.virtual:
                    left = due - clock.now()
                    if left > 0:
                        self._cond.wait(left)
                        continue  # re-check: an earlier item may have arrived
                _, _, fut, value, exc = heapq.heappop(self._heap)
            if clock.virtual:
                clock.sleep_until(due)  # type: ignore[attr-defined]
            # Outside the lock: completing a future runs the caller's callbacks.
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

    def close(self, timeout_s: float) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("emulate timer thread still running after %.1f s", timeout_s)

