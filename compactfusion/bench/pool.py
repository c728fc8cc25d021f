"""``RankPool(n)``: n persistent gloo ranks in spawned processes that run benchmark jobs.

1. ``RankPool(n, threads=1)`` spawns n processes; each sets its torch thread count, joins a
   gloo group (``file://`` rendezvous in a fresh temporary directory, a timeout on the group)
   and creates a second gloo group, ``ctx.plain``, before any emulation starts, so it is
   never shaped: it carries the start-instant agreement of timed runs.
2. ``pool.run(fn, *args)`` calls ``fn(ctx, *args)`` on every rank and returns the results in
   rank order. ``ctx`` (a :class:`RankContext`) also holds a per-process ``cache`` dict, so
   models and handles built by one job are reused by the next.
3. Failures never hang: an exception on a rank is raised in the parent with its traceback
   (:class:`RankError`); a deadline per call kills every child (``TimeoutError``); after a
   failure the pool is closed. ``close()`` (also on ``with`` exit) stops the children.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["RankPool", "RankContext", "RankError"]

logger = logging.getLogger(__name__)

#: Spawn, import torch + diffusers and join the group, on two busy cores.
START_TIMEOUT_S = 300.0
_GRACE_S = 2.0


class RankError(RuntimeError):
    """A rank raised; the message carries its traceback."""


@dataclass
class RankContext:
    """What a job sees on its rank."""

    rank: int
    n: int
    plain: Any  # an unshaped gloo group over all ranks
    cache: dict[str, Any] = field(default_factory=dict)


def _serve(rank: int, n: int, init_file: str, threads: int, timeout_s: float, inbox: Any, outbox: Any) -> None:
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # "one GPU each": ranks must not share intra-op threads
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n,
                                timeout=datetime.timedelta(seconds=timeout_s))
        ctx = RankContext(rank, n, dist.new_group(backend="gloo"))
    except BaseException:
        outbox.put(("err", rank, traceback.format_exc()))
        return
    # A full collection of torch's import heap in the middle of a timed run costs tens of ms.
    gc.collect()
    gc.freeze()
    outbox.put(("ready", rank, None))
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args = job
        try:
            outbox.put(("ok", rank, fn(ctx, *args)))
        except BaseException:
            outbox.put(("err", rank, traceback.format_exc()))
    ctx.cache.clear()
    dist.destroy_process_group()


class RankPool:
    """``n`` persistent gloo ranks running module-level functions on demand."""

    def __init__(self, n: int, *, threads: int = 1, group_timeout_s: float = 300.0,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n: must be an integer >= 1, got {n!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: must be an integer >= 1, got {threads!r}")
        self.n = n
        self._closed = False
        self._dir = tempfile.mkdtemp(prefix="compactfusion-bench-")
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._ins = [ctx.Queue() for _ in range(n)]
        self._procs = [
            ctx.Process(target=_serve, name=f"cf-bench-rank{r}", daemon=True,
                        args=(r, n, os.path.join(self._dir, "store"), threads, group_timeout_s, self._ins[r], self._out))
            for r in range(n)
        ]
        for p in self._procs:
            p.start()
        try:
            self._collect("ready", start_timeout_s)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 600.0) -> list[Any]:
        """``fn(ctx, *args)`` on every rank; results in rank order."""
        if self._closed:
            raise RuntimeError("RankPool is closed")
        for q in self._ins:
            q.put((fn, args))
        try:
            return self._collect("ok", timeout)
        except BaseException:
            self.close()
            raise

    def _collect(self, kind: str, timeout: float) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.n:
            left = deadline - time.monotonic()
            if errors:
                left = min(left, _GRACE_S)
            if left <= 0:
                break
            try:
                tag, rank, value = self._out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in results and r not in errors]
                for r in dead:
                    errors[r] = f"rank {r} exited with code {self._procs[r].exitcode}"
                continue
            if tag == "err":
                errors[rank] = value
            else:
                results[rank] = value
        if errors:
            msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RankError(f"{len(errors)} rank(s) failed:\n{msg}")
        if len(results) < self.n:
            missing = sorted(set(range(self.n)) - set(results))
            raise TimeoutError(f"ranks {missing} did not answer within {timeout:.0f} s ({kind})")
        return [results[r] for r in range(self.n)]

    def close(self) -> None:
        """Stop the children (politely, then by kill) and remove the rendezvous directory."""
        if self._closed:
            return
        self._closed = True
        for q in self._ins:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(10.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        shutil.rmtree(self._dir, ignore_errors=True)
