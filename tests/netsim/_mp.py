"""A persistent group of gloo ranks in spawned processes, for the emulate tests.

``Ranks(n)`` spawns n processes once (``init_method=file://`` in a fresh temporary directory,
a timeout on the group) and ``ranks.run(fn, *args)`` calls ``fn(rank, n, *args)`` on every
rank, returning the results in rank order. Spawning and importing torch costs seconds on two
busy cores, so the tests share one group per size.

Failures never hang: an exception on a rank is raised in the parent with its traceback
(``RankError``), a deadline per call kills every child (``TimeoutError``), and after any
failure the group is closed and ``broken`` tells the fixture to start a fresh one.
"""
from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable

__all__ = ["Ranks", "LazyRanks", "RankError"]

#: Spawn + import torch + join the group, on two cores shared with other jobs.
START_TIMEOUT_S = 120.0
#: Once one rank failed, how long to collect the others' tracebacks.
_GRACE_S = 2.0


class RankError(AssertionError):
    """A rank raised; the message carries the tracebacks."""


def _serve(rank: int, n: int, init_file: str, timeout_s: float, inbox: Any, outbox: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # n ranks on 2 shared cores: intra-op threads only contend
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=n,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except BaseException:
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
        fn, args = job
        try:
            outbox.put(("ok", rank, fn(rank, n, *args)))
        except BaseException:
            outbox.put(("err", rank, traceback.format_exc()))
    dist.destroy_process_group()


class Ranks:
    """``n`` persistent gloo ranks running module-level functions on demand."""

    def __init__(self, n: int, group_timeout_s: float = 60.0) -> None:
        self.n = n
        self.broken = False
        self._dir = tempfile.mkdtemp(prefix="netsim-emu-")
        ctx = mp.get_context("spawn")
        self._out = ctx.Queue()
        self._ins = [ctx.Queue() for _ in range(n)]
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(r, n, os.path.join(self._dir, "store"), group_timeout_s, self._ins[r], self._out),
                daemon=True,
            )
            for r in range(n)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", START_TIMEOUT_S)

    def _collect(self, kind: str, timeout_s: float) -> list[Any]:
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(results) + len(errors) < self.n:
            left = deadline - time.monotonic()
            if errors:
                left = min(left, _GRACE_S)
            if left <= 0:
                break
            try:
                tag, rank, payload = self._out.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in results]
                if dead and not errors:
                    self.close()
                    raise RankError(f"ranks {dead} exited without answering")
                continue
            if tag == "err":
                errors[rank] = payload
            else:
                results[rank] = payload
        if errors:
            self.close()
            raise RankError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
        if len(results) < self.n:
            self.close()
            raise TimeoutError(f"{kind}: ranks {sorted(set(range(self.n)) - set(results))} did not answer in {timeout_s} s")
        return [results[r] for r in range(self.n)]

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0) -> list[Any]:
        if self.broken:
            raise RuntimeError("this rank group is closed after an earlier failure")
        for q in self._ins:
            q.put((fn, args))
        return self._collect(fn.__name__, timeout_s)

    def close(self) -> None:
        """Stop every child (politely, then by force) and remove the rendezvous directory."""
        self.broken = True
        for q in self._ins:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(5.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class LazyRanks:
    """Starts ``Ranks(n)`` on first use and again after a failure closed it, so one failing
    test does not fail every later test that shares the group."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._ranks: Ranks | None = None

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0) -> list[Any]:
        if self._ranks is None or self._ranks.broken:
            self._ranks = Ranks(self.n)
        return self._ranks.run(fn, *args, timeout_s=timeout_s)

    def close(self) -> None:
        if self._ranks is not None:
            self._ranks.close()
