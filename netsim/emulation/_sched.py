"""Which message schedule ``netsim.emulate`` replays for each collective.

Every collective uses ``netsim.model.cost.schedule`` with its default algorithm (ring all-reduce,
all-gather and reduce-scatter, chain broadcast, dissemination barrier), so emulate and the cost
model time the same steps.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..model.cost import Schedule, schedule

__all__ = ["OPS", "collective_schedule"]


#: Collectives emulate models.
OPS: tuple[str, ...] = ("allreduce", "allgather", "reduce_scatter", "broadcast", "barrier")


def collective_schedule(op: str, n: int, sizes: Sequence[float], *, root: int = 0) -> Schedule:
    """Steps of ``op`` on ``n`` ranks; ``sizes[r]`` is rank r's input in bytes (cost-model S).

    All-gather keeps per-rank block sizes; the other collectives take the largest input, since
    torch requires equal inputs there anyway.
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} must be one of {list(OPS)}")
    if len(sizes) != n:
        raise ValueError(f"sizes must hold n={n} values, got {len(sizes)}")
    nbytes = max(sizes, default=0.0)
    if op == "allgather":
        return schedule(op, n, nbytes, sizes=list(sizes))
    return schedule(op, n, nbytes, root=root)
