"""Message schedules of the collectives that ``netsim.emulate`` times.

A schedule is a list of steps; each step is a list of ``(src, dst, nbytes)`` messages, and a
rank's messages of step k+1 wait for all its messages of step k (its sends' serialization and
its receives' arrival). These are the algorithms of the cost table in the design (§3): the
closed forms there are what the replay of these steps gives on a uniform link.

They live here, not in ``netsim.cost``, only because emulate was written before
``cost.schedule`` existed; see :func:`collective_schedule` for how the two are chosen.
"""
from __future__ import annotations

import logging
import math

__all__ = ["Step", "Schedule", "collective_schedule", "local_schedule", "OPS"]

logger = logging.getLogger(__name__)

Step = list[tuple[int, int, float]]
Schedule = list[Step]

#: Collectives emulate models, with the algorithm each uses by default.
OPS: dict[str, str] = {
    "allreduce": "ring",
    "allgather": "ring",
    "reduce_scatter": "ring",
    "broadcast": "chain",
    "barrier": "dissemination",
}


def _ring(n: int, steps: int, nbytes: float) -> Schedule:
    return [[(r, (r + 1) % n, nbytes) for r in range(n)] for _ in range(steps)]


def _chain(n: int, nbytes: float, root: int) -> Schedule:
    # One chunk: the payload walks root -> root+1 -> ... -> root+n-1, (n-1)(L + S/B).
    return [[((root + h) % n, (root + h + 1) % n, nbytes)] for h in range(n - 1)]


def _dissemination(n: int) -> Schedule:
    # ceil(log2 n) rounds of empty messages to rank + 2^k: the classic barrier.
    rounds = math.ceil(math.log2(n)) if n > 1 else 0
    return [[(r, (r + (1 << k)) % n, 0.0) for r in range(n)] for k in range(rounds)]


def local_schedule(op: str, n: int, nbytes: float, *, root: int = 0) -> Schedule:
    """The schedule of ``op`` over ``n`` ranks, each holding ``nbytes`` of input.

    ``nbytes`` follows the cost model: the tensor for all-reduce and reduce-scatter (each
    rank's input), the rank's own block for all-gather, the root's tensor for broadcast.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not nbytes >= 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if n == 1:
        return []
    if op == "allreduce":
        return _ring(n, 2 * (n - 1), nbytes / n)
    if op == "reduce_scatter":
        return _ring(n, n - 1, nbytes / n)
    if op == "allgather":
        return _ring(n, n - 1, nbytes)
    if op == "broadcast":
        if not 0 <= root < n:
            raise ValueError(f"root must be in [0, {n - 1}], got {root}")
        return _chain(n, nbytes, root)
    return _dissemination(n)


def collective_schedule(op: str, n: int, nbytes: float, *, root: int = 0) -> Schedule:
    """The schedule emulate replays for ``op``.

    Barrier and rooted broadcast use :func:`local_schedule`; the rest come from
    ``netsim.cost.schedule`` when it offers them, so emulate and the cost model replay the
    same steps, and from :func:`local_schedule` otherwise.
    """
    if op in ("allreduce", "allgather", "reduce_scatter"):
        try:
            from netsim import cost  # noqa: PLC0415 - optional until cost.py lands
        except ImportError:
            cost = None  # type: ignore[assignment]
        sched = getattr(cost, "schedule", None) if cost is not None else None
        if sched is not None:
            steps = sched(op, n, nbytes, OPS[op])
            return [[(int(s), int(d), float(b)) for s, d, b in step] for step in steps]
    return local_schedule(op, n, nbytes, root=root)
