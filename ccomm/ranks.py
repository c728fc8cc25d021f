"""Local gloo ranks in spawned processes: `RankPool` and the one-shot `run_ranks`.

For tests, benchmarks and examples on one host; multi-host runs go through `torchrun`.

1. `RankPool(n)` spawns n processes. Each sets its torch thread count, joins one gloo group
   (a `file://` rendezvous in a fresh temporary directory, `group_timeout_s` on the group),
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
   stops idle children politely and busy ones by force, and removes the rendezvous directory.
4. `run_ranks(fn, n, *args)` starts a pool, runs `fn` once and closes it.

`fn` and `context` must be module-level functions (they are pickled by reference).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable, Collection

__all__ = ["RankPool", "RankError", "run_ranks"]

#: Spawn, import torch (and whatever the jobs import) and join the group, on two busy cores.
START_TIMEOUT_S = 300.0
#: After the first failure, how long to wait for the other ranks' tracebacks.
ERROR_GRACE_S = 2.0
_POLL_S = 0.05


class RankError(RuntimeError):
    """One or more ranks raised or died; the message holds their tracebacks."""


def _serve(rank: int, n: int, init_file: str, threads: int, group_timeout_s: float,
           context: Callable[[int, int], Any] | None, inbox: Any, outbox: Any) -> None:
    import gc

    import torch
    import torch.distributed as dist

    from . import failfast

    # Ranks stand in for separate devices on a few shared cores: intra-op threads beyond
    # the requested count would only contend with the other ranks.
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
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
        self._dir = tempfile.mkdtemp(prefix=f"{name}-")
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._ins = [ctx.Queue() for _ in range(n)]
        store = os.path.join(self._dir, "store")
        self._procs = [
            ctx.Process(target=_serve, name=f"{name}{r}", daemon=True,
                        args=(r, n, store, threads, float(group_timeout_s), context, self._ins[r], self._out))
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
        shutil.rmtree(self._dir, ignore_errors=True)

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
