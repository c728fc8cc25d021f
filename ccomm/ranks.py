"""Local gloo ranks in spawned processes: `RankPool` and the one-shot `run_ranks`.

For tests, benchmarks and examples on one host; multi-host runs go through `torchrun`.

1. `RankPool(n)` spawns n processes. Each arranges to die with the pool's process (below),
   sets its torch thread count, joins one gloo group (rendezvous on a TCP store the pool
   serves on 127.0.0.1, so nothing is written to disk) within `start_timeout_s`, since ranks
   that start seconds apart on a busy host are not a fault, then sets `group_timeout_s` on
   the group's operations,
   builds its per-rank context with `context(rank, n)` if the pool has a context factory,
   freezes the garbage collector's view of the torch import heap and reports ready.
2. `pool.run(fn, *args, **kwargs)` calls `fn(rank, n, *args, **kwargs)` on every rank, or
   `fn(ctx, *args, **kwargs)` when the pool has a context factory, and returns the results in
   rank order. Results travel as plain pickles (not shared memory), so a tensor result stays
   valid after its rank exits.
3. Failures never hang and never leave processes behind:
   - an exception on a rank is raised in the parent as `RankError` with that rank's
     traceback (and those of ranks that fail within a short grace period); the failing
     rank posts it first (`ccomm.failfast`), so peers waiting on it in a ccomm transfer
     raise `PeerError` naming it within a fraction of a second;
   - a rank that exits without answering is an error too, unless the caller listed it in
     `may_exit` (tests that kill a peer on purpose; its result is None);
   - past the per-call `timeout`, every child is killed and `TimeoutError` names the ranks
     that did not answer.
   After any failure the pool is closed and `broken` is set. `close()` (also on `with` exit)
   stops idle children politely and busy ones by force, and stops the store.
4. Ranks die with the pool's process, even when it is killed by SIGKILL (the OOM killer, a
   scheduler), within about a second: on Linux the kernel sends them SIGKILL when the
   thread that started them exits (`prctl(PR_SET_PDEATHSIG)`, requested only when that is
   the main thread, which lives as long as the process); everywhere, a daemon thread in each
   rank waits on multiprocessing's parent sentinel (a pipe only the parent holds open) and
   ends the rank when it closes.
5. `run_ranks(fn, n, *args)` starts a pool, runs `fn` once and closes it.

`fn` and `context` must be module-level functions (they are pickled by reference).
"""
from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Collection

__all__ = ["RankPool", "RankError", "run_ranks"]

#: Spawn, import torch (and whatever the jobs import) and join the group, on two busy cores.
START_TIMEOUT_S = 300.0
#: After the first failure, how long to wait for the other ranks' tracebacks.
ERROR_GRACE_S = 2.0
_POLL_S = 0.05


_PR_SET_PDEATHSIG = 1
#: The store the pool serves for its ranks' rendezvous.
_STORE_HOST = "127.0.0.1"


class RankError(RuntimeError):
    """One or more ranks raised or died; the message holds their tracebacks."""


def _die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    """End this rank when the pool's process dies, however it dies.

    1. Linux, if asked: the kernel kills us with SIGKILL when the parent thread that started
       us exits. If the parent died before the request took effect, we exit at once.
    2. Everywhere: a daemon thread blocks on the parent sentinel multiprocessing gives every
       spawned child and ends the process when it becomes ready (the parent's end closed).
    """
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # no prctl here: the watch below still holds
    if os.getppid() != parent_pid:
        os._exit(1)
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns only when the parent is gone
        os._exit(1)  # nobody is left to report to; the group's peers fail on their own

    threading.Thread(target=watch, name="ccomm-rank-parent-watch", daemon=True).start()


def _serve(rank: int, n: int, store_port: int, threads: int, start_timeout_s: float, group_timeout_s: float,
           context: Callable[[int, int], Any] | None, inbox: Any, outbox: Any,
           parent_pid: int, pdeathsig: bool) -> None:
    _die_with_parent(parent_pid, pdeathsig)
    import gc

    import torch
    import torch.distributed as dist

    from . import failfast

    # Ranks stand in for separate devices on a few shared cores: intra-op threads beyond
    # the requested count would only contend with the other ranks.
    torch.set_num_threads(threads)
    try:
        start = datetime.timedelta(seconds=start_timeout_s)
        store = dist.TCPStore(_STORE_HOST, store_port, is_master=False, timeout=start)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=n, timeout=start)
        dist.group.WORLD.set_timeout(datetime.timedelta(seconds=group_timeout_s))
        ctx = context(rank, n) if context is not None else None
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        outbox.put(("err", rank, traceback.format_exc()))
        return
    # torch's import leaves a large heap: without this, an occasional full collection stalls
    # a rank for tens of milliseconds in the middle of a timed operation.
    gc.collect()
    gc.freeze()
    outbox.put(("ready", rank, None))
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        failfast.clear()  # a new job: an error posted in an earlier one is no one's business now
        try:
            head = (ctx,) if context is not None else (rank, n)
            outbox.put(("ok", rank, pickle.dumps(fn(*head, *args, **kwargs))))
        except BaseException as exc:  # noqa: BLE001
            failfast.post_error(exc)  # this rank leaves the job: peers waiting on it raise at once
            outbox.put(("err", rank, traceback.format_exc()))
    del ctx  # drop what jobs cached (models, groups) before the process group goes
    dist.destroy_process_group()


def _format_errors(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))


class RankPool:
    """`n` persistent gloo ranks running module-level functions on demand."""

    def __init__(self, n: int, *, threads: int = 1, group_timeout_s: float = 60.0,
                 start_timeout_s: float = START_TIMEOUT_S, context: Callable[[int, int], Any] | None = None,
                 name: str = "ccomm-rank") -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n: must be an integer >= 1, got {n!r}")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads: must be an integer >= 1, got {threads!r}")
        for field, value in (("group_timeout_s", group_timeout_s), ("start_timeout_s", start_timeout_s)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{field}: must be a number > 0, got {value!r}")
        self.n = n
        self.broken = False
        self._closed = False
        from torch.distributed import TCPStore

        self._store = TCPStore(_STORE_HOST, 0, is_master=True, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=float(start_timeout_s)))
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._ins = [ctx.Queue() for _ in range(n)]
        # PDEATHSIG fires when the starting thread exits: only the main thread lives as long
        # as this process, so from any other thread the ranks rely on the sentinel watch.
        pdeathsig = threading.current_thread() is threading.main_thread()
        self._procs = [
            ctx.Process(target=_serve, name=f"{name}{r}", daemon=True,
                        args=(r, n, self._store.port, threads, float(start_timeout_s), float(group_timeout_s), context,
                              self._ins[r], self._out, os.getpid(), pdeathsig))
            for r in range(n)
        ]
        try:
            for p in self._procs:
                p.start()
            self._collect("ready", float(start_timeout_s), may_exit=())
        except BaseException:
            self._kill()
            raise

    # -- public ------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0, may_exit: Collection[int] = (),
            **kwargs: Any) -> list[Any]:
        """`fn` on every rank (see the module docstring); results in rank order.

        Ranks in `may_exit` may die without answering (their result is None); the pool is
        closed afterwards, since its group has lost a member.
        """
        if self.broken:
            raise RuntimeError("RankPool: closed (after close() or a failed run); start a new pool")
        for inbox in self._ins:
            inbox.put((fn, args, kwargs))
        try:
            results = self._collect("ok", timeout, may_exit=may_exit)
        except BaseException:
            self._kill()
            raise
        if may_exit:
            self.close()
        return [None if r is None else pickle.loads(r) for r in results]

    def alive(self) -> list[bool]:
        """Whether each rank's process is still running."""
        return [p.is_alive() for p in self._procs]

    def pids(self) -> list[int]:
        """The ranks' process ids, in rank order."""
        return [p.pid for p in self._procs if p.pid is not None]

    def close(self) -> None:
        """Stop every rank (politely if idle, by force otherwise); idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.broken:
            self.broken = True
            for p, inbox in zip(self._procs, self._ins):
                if p.is_alive():
                    try:
                        inbox.put(None)
                    except (OSError, ValueError):
                        pass
        deadline = time.monotonic() + 10.0
        for p in self._procs:
            if p.pid is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for q in [self._out, *self._ins]:
            q.close()
            q.cancel_join_thread()
        del self._store  # stops serving the rendezvous

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------
    def _kill(self) -> None:
        self.broken = True
        for p in self._procs:
            if p.is_alive():
                p.kill()
        self.close()

    def _collect(self, expected: str, timeout: float, may_exit: Collection[int]) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        grace: float | None = None
        while len(results) + len(errors) < self.n:
            now = time.monotonic()
            if grace is not None and now > grace:
                break
            if now > deadline:
                missing = [r for r in range(self.n) if r not in results and r not in errors]
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s; all ranks killed"
                                   + _format_errors(errors))
            try:
                kind, rank, value = self._out.get(timeout=_POLL_S)
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if r in results or r in errors or p.is_alive():
                        continue
                    if r in may_exit:
                        results[r] = None
                    else:
                        errors[r] = f"rank {r} exited with code {p.exitcode} without answering\n"
                        grace = grace or time.monotonic() + ERROR_GRACE_S
                continue
            if kind == "err":
                errors[rank] = value
                grace = grace or time.monotonic() + ERROR_GRACE_S
            elif kind == expected:
                results[rank] = value
        if errors:
            raise RankError(f"{len(errors)} rank(s) failed:" + _format_errors(errors))
        return [results[r] for r in range(self.n)]


def run_ranks(fn: Callable[..., Any], n: int, *args: Any, timeout: float = 60.0, group_timeout_s: float = 60.0,
              threads: int = 1, may_exit: Collection[int] = (), **kwargs: Any) -> list[Any]:
    """One shot: start `n` ranks, run `fn(rank, n, *args, **kwargs)` once on each, stop them."""
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout: must be a number > 0, got {timeout!r}")
    with RankPool(n, threads=threads, group_timeout_s=group_timeout_s) as pool:
        return pool.run(fn, *args, timeout=timeout, may_exit=may_exit, **kwargs)
