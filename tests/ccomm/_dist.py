"""Run test functions on N gloo ranks in spawned subprocesses.

`DistPool(world_size)` starts N processes once, each joined to one gloo process group
(`init_method=file://...` in a fresh temporary directory, a `timeout=` on the group), and
then runs any number of functions on all ranks: `pool.run(fn, *args)` calls
`fn(rank, world_size, *args)` on every rank and returns the results in rank order.
Reusing one pool for many checks avoids paying the spawn + `import torch` cost per test.

Failure handling, so a broken test fails fast instead of hanging the suite:
- an exception on any rank is re-raised in the parent as `RankError` carrying that rank's
  formatted traceback (and those of other ranks that failed within a short grace period);
- a hard deadline per `run` kills every child and raises `TimeoutError`;
- a rank that exits without answering is reported with its exit code (unless the caller
  listed it in `may_exit`, for tests that kill a peer on purpose).
After any failure the pool is closed (its process group may be half-way through a
collective), and `broken` tells a fixture to start a new one.

`fn` must be a module-level function (it is pickled by reference) and its result must be
picklable; results travel as plain pickles, not through shared memory, so a tensor result
stays valid after its rank exits.
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

__all__ = ["DistPool", "RankError", "run_distributed"]

#: Time for a child to start, import torch and join the group (2 busy cores, cold caches).
START_TIMEOUT_S = 120.0
#: After the first rank fails, how long to wait for the others' tracebacks.
ERROR_GRACE_S = 2.0
_POLL_S = 0.05


class RankError(AssertionError):
    """One or more ranks raised; the message holds their tracebacks."""


def _serve(rank: int, world_size: int, init_file: str, group_timeout_s: float, inbox: Any, outbox: Any) -> None:
    import torch
    import torch.distributed as dist

    # Several ranks share 2 cores with other jobs: intra-op threads would only contend.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=group_timeout_s),
        )
    except BaseException:
        outbox.put(("err", rank, traceback.format_exc()))
        return
    outbox.put(("ready", rank, None))
    while True:
        msg = inbox.get()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            result = fn(rank, world_size, *args, **kwargs)
            outbox.put(("ok", rank, pickle.dumps(result)))
        except BaseException:
            outbox.put(("err", rank, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """`world_size` persistent gloo ranks running functions on demand."""

    def __init__(self, world_size: int, *, group_timeout_s: float = 30.0, start_timeout_s: float = START_TIMEOUT_S) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size} must be >= 1")
        self.world_size = world_size
        self.group_timeout_s = group_timeout_s
        self.broken = False
        self._closed = False
        self._tmp = tempfile.mkdtemp(prefix="ccomm_dist_")
        ctx = mp.get_context("spawn")
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(r, world_size, os.path.join(self._tmp, "pg"), group_timeout_s, self._inboxes[r], self._outbox),
                name=f"ccomm-rank{r}",
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        try:
            self._collect("ready", start_timeout_s, may_exit=())
        except BaseException:
            self.close()
            raise

    # -- public ------------------------------------------------------------------------
    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 60.0,
        may_exit: Collection[int] = (),
        **kwargs: Any,
    ) -> list[Any]:
        """`fn(rank, world_size, *args, **kwargs)` on every rank; results in rank order.

        Ranks in `may_exit` may die without answering (their result is None); the pool
        is closed afterwards since its group has lost a member.
        """
        if self.broken:
            raise RuntimeError("DistPool: a previous run failed; start a new pool")
        for inbox in self._inboxes:
            inbox.put((fn, args, kwargs))
        results = self._collect("ok", timeout, may_exit=may_exit)
        if may_exit:
            self.close()
        return [None if r is None else pickle.loads(r) for r in results]

    def alive(self) -> list[bool]:
        """Whether each rank's process is still running."""
        return [p.is_alive() for p in self._procs]

    def close(self) -> None:
        """Stop every rank (politely if they are idle, by force otherwise); idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.broken:
            self.broken = True
            for p, inbox in zip(self._procs, self._inboxes):
                if p.is_alive():
                    try:
                        inbox.put(None)
                    except (OSError, ValueError):
                        pass
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for q in [self._outbox, *self._inboxes]:
            q.close()
            q.cancel_join_thread()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "DistPool":
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
        error_deadline: float | None = None
        while len(results) + len(errors) < self.world_size:
            now = time.monotonic()
            if error_deadline is not None and now > error_deadline:
                break
            if now > deadline:
                missing = [r for r in range(self.world_size) if r not in results and r not in errors]
                self._kill()
                raise TimeoutError(
                    f"DistPool: ranks {missing} did not finish within {timeout:.0f} s; all ranks killed"
                    + (_format_errors(errors) if errors else "")
                )
            try:
                kind, rank, value = self._outbox.get(timeout=_POLL_S)
            except queue.Empty:
                for r, p in enumerate(self._procs):
                    if r in results or r in errors or p.is_alive():
                        continue
                    if r in may_exit:
                        results[r] = None
                    else:
                        errors[r] = f"rank {r} exited with code {p.exitcode} without answering\n"
                        error_deadline = error_deadline or time.monotonic() + ERROR_GRACE_S
                continue
            if kind == "err":
                errors[rank] = value
                error_deadline = error_deadline or time.monotonic() + ERROR_GRACE_S
            elif kind == expected:
                results[rank] = value
        if errors:
            self._kill()
            raise RankError(_format_errors(errors))
        return [results[r] for r in range(self.world_size)]


def _format_errors(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    group_timeout_s: float = 30.0,
    may_exit: Collection[int] = (),
    **kwargs: Any,
) -> list[Any]:
    """One-shot: start `world_size` ranks, run `fn` once on each, stop them."""
    with DistPool(world_size, group_timeout_s=group_timeout_s) as pool:
        return pool.run(fn, *args, timeout=timeout, may_exit=may_exit, **kwargs)
