"""Run one function on n local gloo ranks in spawned processes, with a hard deadline.

`run_ranks(fn, n, *args, timeout_s=...)`:

1. makes a temporary directory for a `file://` rendezvous and spawns n processes;
2. each process joins one gloo process group, calls `fn(rank, n, *args)` and sends the
   picklable result (or its formatted traceback) back on a queue;
3. the parent collects the n answers; past `timeout_s`, on a rank's exception or on a rank
   that died without answering, it kills every child and raises `RanksFailed`, so a run
   never hangs;
4. the children and the directory are always cleaned up.

`fn` must be a module-level function (it is pickled by reference).
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable

__all__ = ["run_ranks", "RanksFailed"]

logger = logging.getLogger(__name__)

#: After the first failure, how long to wait for the other ranks' tracebacks.
_GRACE_S = 2.0
_POLL_S = 0.05


class RanksFailed(RuntimeError):
    """A rank raised, died or missed the deadline; the message holds the tracebacks."""


def _child(rank: int, n: int, init_file: str, group_timeout_s: float, fn: Callable[..., Any],
           args: tuple[Any, ...], out: Any) -> None:
    import torch
    import torch.distributed as dist

    # n ranks share few cores: intra-op threads would only contend with each other.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
        try:
            result = fn(rank, n, *args)
        finally:
            dist.destroy_process_group()
        out.put(("ok", rank, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        out.put(("err", rank, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], n: int, *args: Any, timeout_s: float = 300.0,
              group_timeout_s: float = 60.0) -> list[Any]:
    """`fn(rank, n, *args)` on n fresh gloo ranks; results in rank order (see module docstring)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: must be an integer >= 1, got {n!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
    tmp = tempfile.mkdtemp(prefix="deco_rt_")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, n, os.path.join(tmp, "pg"), group_timeout_s, fn, args, out),
                         name=f"deco-rt-rank{r}", daemon=True) for r in range(n)]
    try:
        for p in procs:
            p.start()
        return _collect(procs, out, n, timeout_s)
    finally:
        _stop(procs)
        out.close()
        out.cancel_join_thread()
        shutil.rmtree(tmp, ignore_errors=True)


def _collect(procs: list[Any], out: Any, n: int, timeout_s: float) -> list[Any]:
    results: dict[int, bytes] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    grace: float | None = None
    while len(results) + len(errors) < n:
        now = time.monotonic()
        if now > deadline or (grace is not None and now > grace):
            break
        try:
            kind, rank, value = out.get(timeout=_POLL_S)
        except queue.Empty:
            for r, p in enumerate(procs):
                # Exit code 0 always follows an answer (the child puts it before returning).
                if r not in results and r not in errors and p.exitcode not in (None, 0):
                    errors[r] = f"rank {r} exited with code {p.exitcode} without answering"
            if errors and grace is None:
                grace = time.monotonic() + _GRACE_S
            continue
        if kind == "ok":
            results[rank] = value
        else:
            errors[rank] = value
            if grace is None:
                grace = time.monotonic() + _GRACE_S
    if errors or len(results) < n:
        missing = [r for r in range(n) if r not in results and r not in errors]
        msg = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        if missing:
            msg = f"ranks {missing} did not finish within {timeout_s:.0f} s" + msg
        raise RanksFailed(msg.strip())
    return [pickle.loads(results[r]) for r in range(n)]


def _stop(procs: list[Any]) -> None:
    deadline = time.monotonic() + 5.0
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)
