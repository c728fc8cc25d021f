"""The benchmark's rank pool: `ccomm.ranks.RankPool` with a per-rank `RankContext`.

`bench_pool(n, threads, timeout_s)` starts n persistent gloo ranks. Each builds a
:class:`RankContext` right after joining the group: a second gloo group, ``ctx.plain``, made
before any emulation starts so it is never shaped (it carries the start-instant agreement of
timed runs), and a per-process ``cache`` dict, so models and handles built by one job are
reused by the next. Jobs are called as ``fn(ctx, *args)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ccomm.ranks import RankError, RankPool

__all__ = ["RankContext", "RankError", "RankPool", "bench_pool", "make_context"]


@dataclass
class RankContext:
    """What a job sees on its rank."""

    rank: int
    n: int
    plain: Any  # an unshaped gloo group over all ranks
    cache: dict[str, Any] = field(default_factory=dict)


def make_context(rank: int, n: int) -> RankContext:
    """Runs on each rank after it joined the default group (see the module docstring)."""
    import torch.distributed as dist

    return RankContext(rank, n, dist.new_group(backend="gloo"))


def bench_pool(n: int, *, threads: int = 1, timeout_s: float = 300.0) -> RankPool:
    """n ranks with `threads` torch threads each ("one device each") and a `RankContext`."""
    return RankPool(n, threads=threads, group_timeout_s=timeout_s, start_timeout_s=300.0,
                    context=make_context, name="cf-bench-rank")
