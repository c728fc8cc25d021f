"""Fail fast across ranks: a rank that leaves on an error tells the others, whose waits raise at once.

Without this, a rank that raises between two collectives leaves its peers blocked in the
next one for the whole process-group timeout (30 min by default), and they then report a
timeout that hides the real cause. The rule:

1. A rank that leaves on an exception posts "<ExceptionType>: <message>" under its global
   rank in the default group's key-value store (`post_error`). It does so where it leaves:
   `sys.excepthook` (installed by `install_excepthook`, which `ccomm.comm` calls; it then
   lingers `LINGER_S` so that a rank hosting the store keeps it up while peers read),
   `ccomm.ranks` when a job raises, or a `posting()` block the application knows is fatal.
   Errors that are caught and handled are never posted, so they cannot fail a healthy peer.
2. `wait_works` (what `ccomm.comm.CommHandle.wait` uses) does not block in the backend's
   `wait()`: it waits on the works' futures (collectives) or on a helper thread (gloo
   point-to-point works, which have no future and never report completion before their
   `wait()`). Once a wait has lasted `CHECK_AFTER_S`, it reads the store every `POLL_S`;
   a posted error of another rank of the group raises `PeerError` naming that rank and its
   reason. A transfer that completes sooner never touches the store.
   Futures handed out instead of a wait (`CommHandle.get_future`, which DDP hooks return)
   are `watch`ed by one daemon thread with the same timing, which fails them with the
   `PeerError`.
3. `clear()` withdraws this rank's post: `ccomm.ranks` calls it before every job, and code
   that catches a posted error and carries on must call it before its next transfer (a
   rank also withdraws its post when it starts waiting on a transfer, but a peer that has
   waited 0.1 s by then may have read it already). A `PeerError` is never posted: the
   failure it reports is posted already.

The store is the default group's, which every subgroup's store is a prefix of, so this
works for any group on gloo and NCCL alike; without a default group (or a store), waits
fall back to the backend's blocking `wait()`.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence

import torch.distributed as dist

from .errors import CommError
from .exitguard import completing, stop_at_exit

__all__ = [
    "PeerError", "post_error", "peer_error", "posting", "wait_works", "watch", "clear", "install_excepthook",
    "CHECK_AFTER_S", "POLL_S", "LINGER_S",
]

logger = logging.getLogger(__name__)

#: A wait this old starts reading the store (a completed transfer never does).
CHECK_AFTER_S = 0.1
#: Interval between two reads of the store while a wait lasts.
POLL_S = 0.1
#: How long the excepthook keeps a failing process alive after posting (peers read meanwhile).
LINGER_S = 3 * POLL_S + CHECK_AFTER_S
_PREFIX = "ccomm/failfast/"
_COUNT = _PREFIX + "count"
_MAX_REASON = 2000

_posted = False  # this process has an error in the store


class PeerError(CommError):
    """Another rank failed; raised instead of waiting for the group's timeout."""

    def __init__(self, rank: int, reason: str, what: str) -> None:
        super().__init__(f"{what}: rank {rank} failed and will not take part: {reason}")
        self.rank = rank
        self.reason = reason


def _store() -> Any:
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def post_error(exc: BaseException | str) -> None:
    """Tell every rank of the job that this one failed (best effort: never raises)."""
    global _posted
    store = _store()
    if store is None or isinstance(exc, PeerError):
        return
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    try:
        store.set(f"{_PREFIX}rank{dist.get_rank()}", reason[:_MAX_REASON])
        store.add(_COUNT, 1)
        _posted = True
    except Exception as post_exc:  # noqa: BLE001 - the original error must still propagate
        logger.warning("ccomm.failfast: could not post this rank's error: %s", post_exc)


def clear() -> None:
    """Withdraw this rank's posted error (it recovered, or a new job starts)."""
    global _posted
    if not _posted:
        return
    _posted = False
    store = _store()
    if store is None:
        return
    try:
        if store.delete_key(f"{_PREFIX}rank{dist.get_rank()}"):
            store.add(_COUNT, -1)
    except Exception as exc:  # noqa: BLE001
        logger.warning("ccomm.failfast: could not withdraw this rank's error: %s", exc)


def peer_error(group: Any = None, what: str = "wait") -> PeerError | None:
    """The error posted by another rank of `group` (lowest rank first), or None."""
    store = _store()
    if store is None:
        return None
    try:
        if store.add(_COUNT, 0) <= 0:
            return None
        me = dist.get_rank()
        ranks = range(dist.get_world_size()) if group is None else dist.get_process_group_ranks(group)
        for r in sorted(ranks):
            key = f"{_PREFIX}rank{r}"
            if r != me and store.check([key]):
                return PeerError(r, store.get(key).decode(errors="replace"), what)
    except Exception as exc:  # noqa: BLE001 - a broken store must not turn into a false peer error
        logger.debug("ccomm.failfast: store not readable: %s", exc)
    return None


@contextlib.contextmanager
def posting() -> Iterator[None]:
    """Post any exception that leaves the block (a `PeerError` is not posted again).

    For code whose errors end the rank's part in the job; a caught-and-handled error that
    was posted would fail the peers' waits.
    """
    try:
        yield
    except PeerError:
        raise
    except BaseException as exc:
        post_error(exc)
        raise


_previous_hook: Any = None


def _excepthook(tp: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if not isinstance(exc, (PeerError, KeyboardInterrupt)) and _store() is not None:
        post_error(exc)
        if _posted:
            time.sleep(LINGER_S)  # the store may live in this process (rank 0's TCPStore)
    (_previous_hook or sys.__excepthook__)(tp, exc, tb)


def install_excepthook() -> None:
    """Post an uncaught exception before the process exits (idempotent; chains the previous hook)."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook


class _Watcher:
    """One daemon thread failing watched futures when a peer posts its error.

    The entries it drops hold the last references to finished handles and their result
    tensors, and freeing a tensor releases and retakes the GIL: at exit the thread is
    stopped and joined (`ccomm.exitguard.stop_at_exit`), so it never does that while the
    interpreter finalizes. Its entries then stay with this object, freed by the main thread.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[float, Callable[[], bool], Callable[[PeerError], None], str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ccomm-failfast-watch", daemon=True)
        self._thread.start()
        stop_at_exit(self.stop)

    def stop(self, timeout_s: float) -> bool:
        """End the thread after its current poll; True once it has ended (joined)."""
        self.stopping.set()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self.stopping.wait(POLL_S):  # a poll, or the exit guard's stop
            self._poll()

    def _poll(self) -> None:
        now = time.monotonic()
        with self.lock:
            self.entries = [e for e in self.entries if not e[1]()]
            due = [e for e in self.entries if now - e[0] >= CHECK_AFTER_S]
        if not due:
            return
        # The store calls release the GIL and retake it in a noexcept destructor: a main
        # thread that reaches finalization meanwhile aborts the process, so the exit
        # guard waits for this block (ccomm.exitguard.completing).
        with completing():
            err = peer_error(None, due[0][3])
        if err is None:
            return
        with self.lock:
            failed, self.entries = self.entries, []
        for _, _, fail, what in failed:
            fail(PeerError(err.rank, err.reason, what))


_watcher: _Watcher | None = None


def watch(is_done: Callable[[], bool], fail: Callable[[PeerError], None], what: str = "wait") -> None:
    """Call `fail(PeerError)` if a peer posts its error before `is_done()` (see the module docstring)."""
    global _watcher
    if _store() is None:
        return
    with _waiter_lock:
        if _watcher is None:
            _watcher = _Watcher()
    if _watcher.stopping.is_set():
        return  # the process is exiting (exit guard): a new thread could outlive the guard's wait
    with _watcher.lock:
        _watcher.entries.append((time.monotonic(), is_done, fail, what))


class _Waiter:
    """A daemon thread that calls blocking `wait()`s handed to it (works without futures).

    A gloo point-to-point work's `wait()` consumes its completion: a second call blocks
    until the group's timeout. So the thread's `wait()` is the only one, and it hands the
    backend's error (if any) back through `_Job.error`.
    """

    def __init__(self) -> None:
        self.jobs: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()
        threading.Thread(target=self._run, name="ccomm-failfast-wait", daemon=True).start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                for w in job.works:
                    w.wait()
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                job.error = exc
            job.done.set()


class _Job:
    __slots__ = ("works", "done", "error", "threaded")

    def __init__(self, works: Sequence[Any]) -> None:
        self.works = list(works)
        self.done = threading.Event()
        self.error: Exception | None = None
        self.threaded = False


_waiter: _Waiter | None = None
_waiter_lock = threading.Lock()


def _start(works: Sequence[Any]) -> _Job:
    """A job whose `done` is set once every work completed (futures, else a waiter thread)."""
    global _waiter
    job = _Job(works)
    try:
        futs = [w.get_future() for w in works]
    except RuntimeError:  # gloo point-to-point works have no future
        job.threaded = True
        with _waiter_lock:
            if _waiter is None:
                _waiter = _Waiter()
            _waiter.jobs.put(job)
        return job
    remaining = [len(futs)]
    lock = threading.Lock()

    def one_done(_: Any) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                job.done.set()

    for f in futs:
        f.add_done_callback(one_done)
    return job


def _abandon_waiter() -> None:
    # Its thread may stay blocked on a transfer that never completes: later waits get a new one.
    global _waiter
    with _waiter_lock:
        _waiter = None


def wait_works(works: Sequence[Any], group: Any = None, what: str = "wait") -> None:
    """Wait for every backend work in `works`, or raise `PeerError` as soon as a peer posted one.

    Backend errors (a timeout, a lost peer) are raised by the works' own `wait()`, as before.
    """
    if _posted:
        clear()  # this rank carried on after its error: it takes part in this transfer
    pending = [w for w in works if not w.is_completed()]
    if not pending or _store() is None:
        for w in works:
            w.wait()
    else:
        job = _start(pending)
        if not job.done.wait(CHECK_AFTER_S):
            while not job.done.wait(POLL_S):
                err = peer_error(group, what)
                if err is not None:
                    if job.threaded:
                        _abandon_waiter()
                    raise err
        if job.threaded:
            if job.error is not None:
                raise job.error
            for w in works:
                if w not in pending:
                    w.wait()
        else:
            for w in works:
                w.wait()  # returns at once now; raises the backend's error, if any
