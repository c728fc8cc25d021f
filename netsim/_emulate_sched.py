"""Which message schedule ``netsim.emulate`` replays for each collective.

All-reduce, all-gather, reduce-scatter and broadcast use ``netsim.cost.schedule`` with its
default algorithm, so emulate and the cost model time the same steps. ``cost`` has no barrier;
emulate models it as the dissemination barrier: ceil(log2 n) rounds of empty messages to
rank + 2^k, i.e. ceil(log2 n) one-way latencies on an idle network.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from .cost import Schedule, schedule

__all__ = ["OPS", "collective_schedule"]

logger = logging.getLogger(__name__)

#: Collectives emulate models.
OPS: tuple[str, ...] = ("allreduce", "allgather", "reduce_scatter", "broadcast", "barrier")


def _dissemination(n: int) -> Schedule:
    rounds = math.ceil(math.log2(n)) if n > 1 else 0
    return [[(r, (r + (1 << k)) % n, 0.0) for r in range(n)] for k in range(rounds)]


def collective_schedule(op: str, n: int, sizes: Sequence[float], *, root: int = 0) -> Schedule:
    """Steps of ``op`` on ``n`` ranks; ``sizes[r]`` is rank r's input in bytes (cost-model S).

    All-gather keeps per-rank block sizes; the other collectives take the largest input, since
    torch requires equal inputs there anyway.
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} must be one of {list(OPS)}")
    if len(sizes) != n:
        raise ValueError(f"sizes must hold n={n} values, got {len(sizes)}")
    if op == "barrier":
        return _dissemination(n)
    if op == "allgather":
        return schedule(op, n, max(sizes, default=0.0), sizes=list(sizes))
    return schedule(op, n, max(sizes, default=0.0), root=root)
