"""Errors, the async `CommHandle` and the checks every transport call shares.

Failures of the backend (including a peer that died or stopped answering within the
group's timeout) surface as `CommError`, or `CommTimeoutError` when the backend reports
a timeout; the transport never waits longer than the process group's own timeout.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import CommError, CommTimeoutError
from ..exitguard import completing
from ..failfast import PeerError, install_excepthook, wait_works, watch
from ..payload import Payload

__all__ = [
    "CommError",
    "CommTimeoutError",
    "CommHandle",
    "PACKED_DTYPES",
    "check_payload",
    "finish_sync",
    "group_rank_and_size",
    "issue",
    "wrap_error",
]


T = TypeVar("T")

#: Buffer dtypes whose elementwise sum is meaningless (bit-packed codes, bytes, flags).
PACKED_DTYPES = (torch.uint8, torch.int8, torch.bool)

# Substrings of backend error messages that mean "the group's timeout expired"
# (gloo: "Timed out waiting 3000ms ...", "Application timeout caused pair closure";
# NCCL watchdog: "Watchdog caught collective operation timeout").
_TIMEOUT_MARKERS = ("timed out", "timeout")

# A rank leaving on an uncaught exception tells its peers first (ccomm.failfast).
install_excepthook()


def wrap_error(exc: BaseException, what: str) -> CommError:
    msg = f"{what}: {exc}"
    if any(m in str(exc).lower() for m in _TIMEOUT_MARKERS):
        return CommTimeoutError(msg)
    return CommError(msg)


class CommHandle(Generic[T]):
    """Handle of an asynchronous transport call.

    `wait()` blocks until the transfer is done and returns the call's result (the same
    value the synchronous form returns); calling it again returns the same object, or
    raises the same error. `is_completed()` never blocks. `get_future()` returns a
    `torch.futures.Future` completed with the result (or the `CommError`).
    """

    def __init__(self, works: Sequence[Any], finish: Callable[[], T], what: str) -> None:
        self._works = list(works)
        self._finish = finish
        self._what = what
        # Reentrant and never held while blocking on the backend: a future callback may
        # run inline in the thread that completes the work (gloo's worker) or in the
        # thread calling get_future(), and must not deadlock against wait().
        self._lock = threading.RLock()
        self._done = False
        self._result: T | None = None
        self._error: CommError | None = None
        self._future: torch.futures.Future[T] | None = None

    def wait(self) -> T:
        """The result; raises `PeerError` as soon as another rank posted its failure
        (`ccomm.failfast`), instead of waiting out the group's timeout."""
        if not self._done:
            try:
                wait_works(list(self._works), what=self._what)
            except PeerError as exc:
                self._fail(exc)
            except RuntimeError as exc:  # DistBackendError and gloo errors are RuntimeErrors
                self._fail(exc)
            else:
                self._succeed()
        return self._outcome()

    def is_completed(self) -> bool:
        if self._done:
            return True
        return all(w.is_completed() for w in list(self._works))

    def get_future(self) -> "torch.futures.Future[T]":
        """A future holding the result (the same future on every call)."""
        with self._lock:
            if self._future is not None:
                return self._future
            futs: list[torch.futures.Future[Any]] | None
            try:
                futs = [w.get_future() for w in self._works] if not self._done else []
            except RuntimeError:
                # gloo's point-to-point works have no futures: wait on a helper thread.
                futs = None
            fut: torch.futures.Future[T] = torch.futures.Future()
            self._future = fut
            if futs is not None:
                # add_done_callback + set_exception keeps the CommError type; an exception
                # raised inside `then` would reach the waiter as a plain RuntimeError.
                torch.futures.collect_all(futs).add_done_callback(lambda all_done: self._on_futures(all_done, fut))
                if not fut.done():  # a peer's failure must reach whoever waits on the future
                    watch(fut.done, lambda err: self._fail_future(err, fut), self._what)
            else:
                refs: list[Any] = [self, fut]
                threading.Thread(target=_wait_then_complete, args=(refs,), name="ccomm-wait", daemon=True).start()
            return fut

    # -- internals ---------------------------------------------------------------------
    def _succeed(self) -> None:
        with self._lock:
            if self._done:
                return
            try:
                self._result = self._finish()
            except RuntimeError as exc:
                self._error = wrap_error(exc, self._what)
                self._error.__cause__ = exc
            self._done = True
            self._works = []  # release the buffers the backend's work objects hold

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._done:
                return
            # A PeerError already names this call and the failed rank.
            self._error = exc if isinstance(exc, PeerError) else wrap_error(exc, self._what)
            if self._error is not exc:
                self._error.__cause__ = exc
            self._done = True
            self._works = []

    def _outcome(self) -> T:
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _fail_future(self, err: PeerError, fut: "torch.futures.Future[T]") -> None:
        # Runs on ccomm.failfast's watcher thread; set_exception wakes the waiter before
        # that thread retakes the GIL, so the exit guard must wait for it (ccomm.exitguard).
        self._fail(err)
        with self._lock, completing():
            if not fut.done():
                fut.set_exception(err)

    def _on_futures(
        self, all_done: "torch.futures.Future[list[torch.futures.Future[Any]]]", fut: "torch.futures.Future[T]"
    ) -> None:
        try:
            for f in all_done.value():
                f.value()  # raises the backend's error, if any
        except RuntimeError as exc:
            self._fail(exc)
        else:
            self._succeed()
        with self._lock:
            if fut.done():  # failed already by a peer's error (ccomm.failfast.watch)
                return
            if self._error is not None:
                fut.set_exception(self._error)
            else:
                fut.set_result(self._result)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"CommHandle({self._what!r}, completed={self.is_completed()})"


def _wait_then_complete(refs: list[Any]) -> None:
    """Body of a "ccomm-wait" thread: wait for refs = [handle, future], then complete the
    future with the result or the error.

    Every reference this thread holds to the handle, the future and the result is dropped
    inside the `completing()` block, which the exit guard counts: freeing a tensor releases
    and retakes the GIL, which aborts the process once the interpreter finalizes
    (ccomm.exitguard). `refs` is emptied first because the Thread object keeps its arguments
    until this function has returned, outside the block."""
    handle, fut = refs
    refs.clear()
    value: Any = None
    error: Exception | None = None
    try:
        value = handle.wait()
    except Exception as exc:  # whatever wait() raises must reach the future's waiter
        error = exc  # completed after the except clause, which holds the error until it ends
    with completing():
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)
        del value, error, handle, fut


def finish_sync(handle: CommHandle[T], async_op: bool) -> "T | CommHandle[T]":
    return handle if async_op else handle.wait()


def issue(what: str, fn: Callable[[], Any]) -> Any:
    """Call a torch.distributed function, turning backend failures into CommError."""
    try:
        return fn()
    except RuntimeError as exc:
        raise wrap_error(exc, what) from exc


def check_payload(payload: Any, fn: str) -> Payload:
    if not isinstance(payload, Payload):
        raise ValueError(f"{fn}: payload must be a ccomm.Payload, got {type(payload).__name__}")
    return payload


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)

