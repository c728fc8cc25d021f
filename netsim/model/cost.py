"""Collective cost model: step schedules and their step-synchronous completion times.

Every collective is a schedule: a list of steps, each a list of ``(src, dst, nbytes)`` messages.
:func:`schedule` builds them; the ``*_time`` functions evaluate them step-synchronously:

* step k starts when step k-1 has ended everywhere (time t);
* every resource (uplink, downlink, or mesh pair) serializes the bytes the step puts on it,
  from t, on its own rate trace (``time_to_send(bits, start_s=t)``: exact for traces);
* a message ends one latency after the last of its resources has finished;
* the step ends at its last message.

On uniform links this gives the closed forms of the design table (B byte/s, L s, h the tree
depth, k chunks), e.g. ring all-reduce ``2(n-1)(L + S/(nB))``. On heterogeneous links a step
costs its slowest edge (an upper bound for schedules whose ranks could run ahead); the
:class:`netsim.model.clock.Simulator` replays the same schedules message by message for exact times.
The two agree on uniform links for ring, direct, ps, barrier and unpipelined (k = 1) chain and
full-tree schedules. With k > 1 the replay overlaps each chunk's latency with the next chunk's
serialization, so it is faster than the step-synchronous form, which charges L every step.

Tree algorithms use the heap-ordered binary tree (children of i are 2i+1, 2i+2), so h is
``floor(log2 n)``, not the design table's ``ceil(log2 n)`` (the two differ when n is not a
power of two; the floor is the depth this tree really has). In shared mode c = 2 counts the
two children sharing their parent's link; on trees that are not full some steps have one
child and cost less, so ``2(h+k-1)(L + 2S/(kB))`` is then an upper bound.

``S`` is each rank's input: the tensor for all-reduce / reduce-scatter / all-to-all / ps, the
own block for all-gather, the root's tensor for broadcast.

The all-gather and all-reduce algorithms that ``ccomm.comm`` runs (ring, recursive doubling,
Bruck, binary tree) come from :mod:`ccomm.schedule`, the one description of what that
transport sends: recursive doubling and Bruck cost ``ceil(log2 n)`` latencies where the ring
costs ``n - 1``. ``sizes_known=False`` adds what ``ccomm.comm`` does to learn payload sizes
(the ring: a ring of 8-byte headers first and blocks padded to the largest; log-depth: an
int64 per block leading each round's messages).

All of the above is the **ideal transport**: a message leaves as soon as its sender has it
(NCCL-like, with receive buffers posted ahead). ``transport="gloo"`` times all-reduce and
all-gather by gloo's own protocol instead (:mod:`netsim.model.gloo`: a message leaves only
once the receiver's "recv ready" notice has arrived, replayed message by message over gloo's
ring programs and ccomm's point-to-point rounds); it needs a uniform link.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from ccomm import schedule as ccs
from ccomm.schedule import tree_depth

from . import gloo
from .link import Link
from .topo import Resource, Topo

__all__ = [
    "ALGOS",
    "TRANSPORTS",
    "Schedule",
    "allgather_time",
    "allreduce_time",
    "alltoall_time",
    "barrier_time",
    "broadcast_time",
    "collective_time",
    "p2p_time",
    "ps_time",
    "reduce_scatter_time",
    "schedule",
    "schedule_time",
    "tree_depth",
]


Step = list[tuple[int, int, float]]
Schedule = list[Step]

#: Algorithms per op; the first is the default.
ALGOS: dict[str, tuple[str, ...]] = {
    "allreduce": ("ring", "tree", "doubling"),
    "reduce_scatter": ("ring",),
    "allgather": ("ring", "direct", "doubling", "bruck"),
    "broadcast": ("chain", "tree"),
    "alltoall": ("direct",),
    "ps": ("pushpull", "push", "pull"),
    "barrier": ("dissemination",),
}
#: Transport profiles: "ideal" (a message leaves when its sender has it; the default) and
#: "gloo" (gloo's TCP rendezvous, `netsim.model.gloo`; all-reduce and all-gather only).
TRANSPORTS = ("ideal", "gloo")


# ---------------------------------------------------------------------------- schedules
def _shifted(n: int, size_of: Sequence[float]) -> Schedule:
    # One step; messages ordered by shift d (i -> i+d) so that served in list order no rank's
    # uplink or downlink is asked for two messages at once until the previous round is done.
    return [[(i, (i + d) % n, float(size_of[i])) for d in range(1, n) for i in range(n)]]


def _tree_bcast(n: int, chunk: float, k: int) -> Schedule:
    depth = tree_depth(n)
    steps: Schedule = [[] for _ in range(depth + k - 1)]
    for v in range(1, n):
        dv = tree_depth(v + 1)
        for m in range(k):
            steps[(dv - 1) + m].append(((v - 1) // 2, v, chunk))
    return steps


def _chain(n: int, chunk: float, k: int, root: int) -> Schedule:
    steps: Schedule = [[] for _ in range(n - 2 + k)]
    for h in range(n - 1):
        for m in range(k):
            steps[h + m].append(((root + h) % n, (root + h + 1) % n, chunk))
    return steps


def schedule(
    op: str,
    n: int,
    nbytes: float,
    algo: str | None = None,
    *,
    sizes: Sequence[float] | None = None,
    chunks: int = 1,
    root: int = 0,
    sizes_known: bool = True,
    pipelined: bool = True,
) -> Schedule:
    """Per-step ``(src, dst, nbytes)`` lists of ``op`` on n ranks (see the module docstring).

    ``sizes`` gives per-rank block sizes for all-gather (codecs whose payload sizes differ);
    ``chunks`` pipelines tree and chain algorithms; ``root`` is the broadcast root / ps server.
    ``sizes_known`` and ``pipelined`` (all-gather) are those of :func:`ccomm.schedule.allgather_schedule`.
    """
    if op not in ALGOS:
        raise ValueError(f"op={op!r} must be one of {sorted(ALGOS)}")
    algo = ALGOS[op][0] if algo is None else algo
    if algo not in ALGOS[op]:
        raise ValueError(f"algo={algo!r} must be one of {ALGOS[op]} for op={op!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    if not (math.isfinite(nbytes) and nbytes >= 0):
        raise ValueError(f"nbytes={nbytes!r} must be finite and >= 0")
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks={chunks!r} must be an integer >= 1")
    if not (isinstance(root, int) and 0 <= root < n):
        raise ValueError(f"root={root!r} must be a rank in [0, {n - 1}]")
    if sizes is not None:
        if op != "allgather":
            raise ValueError(f"sizes= is only meaningful for allgather, not op={op!r}")
        if len(sizes) != n or any(not (math.isfinite(s) and s >= 0) for s in sizes):
            raise ValueError(f"sizes must hold n={n} finite values >= 0, got {list(sizes)}")
    if not sizes_known and op != "allgather":
        raise ValueError(f"sizes_known=False is only meaningful for allgather, not op={op!r}")
    if n == 1:
        return []
    if op == "allreduce":
        return ccs.allreduce_schedule(algo, n, nbytes, chunks=chunks)
    if op == "reduce_scatter":
        # The ring all-reduce's first half.
        return ccs.allreduce_schedule("ring", n, nbytes)[: n - 1]
    if op == "allgather":
        blocks = [float(s) for s in sizes] if sizes is not None else [float(nbytes)] * n
        if algo == "direct":
            return _shifted(n, blocks)
        return ccs.allgather_schedule(algo, n, blocks, sizes_known=sizes_known, pipelined=pipelined)
    if op == "broadcast":
        if algo == "chain":
            return _chain(n, nbytes / chunks, chunks, root)
        if root != 0:
            raise ValueError("broadcast algo='tree' is rooted at rank 0 (root=0)")
        return _tree_bcast(n, nbytes / chunks, chunks)
    if op == "alltoall":
        return _shifted(n, [nbytes / n] * n)
    if op == "barrier":
        # ceil(log2 n) rounds; in round k every rank notifies rank + 2^k (nbytes is ignored).
        return [[(i, (i + (1 << k)) % n, 0.0) for i in range(n)] for k in range(math.ceil(math.log2(n)))]
    push = [[(i, root, float(nbytes)) for i in range(n) if i != root]]
    pull = [[(root, i, float(nbytes)) for i in range(n) if i != root]]
    return {"push": push, "pull": pull, "pushpull": push + pull}[algo]


# ---------------------------------------------------------------------------- evaluation
def _as_topo(net: Topo | Link, n: int | None, shared: bool) -> Topo:
    if isinstance(net, Topo):
        if n is not None and n != net.n:
            raise ValueError(f"n={n} differs from the topology's n={net.n}")
        return net
    if isinstance(net, Link):
        if n is None:
            raise ValueError("n is required when a Link (not a Topo) is given")
        return Topo(n, net, shared=shared)
    raise ValueError(f"net={net!r} must be a netsim.Link or netsim.Topo")


def schedule_time(topo: Topo, steps: Schedule, start_s: float = 0.0) -> float:
    """Step-synchronous duration of ``steps`` on ``topo`` starting at ``start_s``."""
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s={start_s!r} must be finite and >= 0")
    t = start_s
    for step in steps:
        if not step:
            continue
        load: dict[Resource, float] = defaultdict(float)
        for s, d, b in step:
            for r in topo.resources(s, d):
                load[r] += b
        done = {r: t + topo.resource_trace(r).time_to_send(8.0 * b, t) for r, b in load.items()}
        end = t
        for s, d, b in step:
            link = topo.pair_link(s, d)
            fin = max(done[r] for r in topo.resources(s, d))
            if link.mathis_mbps is not None:  # a lossy pair's TCP cannot exceed Mathis' rate
                fin = max(fin, t + topo.serialization_time(s, d, b, t))
            end = max(end, fin + link.latency_s)
        t = end
    return t - start_s


def collective_time(
    op: str,
    nbytes: float,
    net: Topo | Link,
    n: int | None = None,
    algo: str | None = None,
    start_s: float = 0.0,
    *,
    shared: bool = True,
    sizes: Sequence[float] | None = None,
    chunks: int = 1,
    root: int = 0,
    sizes_known: bool = True,
    transport: str = "ideal",
) -> float:
    """Step-synchronous duration of :func:`schedule` ``(op, n, nbytes, algo, ...)`` on ``net``.

    ``transport="gloo"`` replays gloo's protocol instead (module docstring; all-reduce and
    all-gather on a uniform link, equal blocks, known sizes)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r} must be one of {TRANSPORTS}")
    topo = _as_topo(net, n, shared)
    if transport == "gloo":
        if op not in gloo.OPS or sizes is not None or not sizes_known or chunks != 1:
            raise ValueError(f"transport='gloo' models {sorted(gloo.OPS)} with equal blocks, known sizes and "
                             f"chunks=1 only (op={op!r}, sizes={sizes!r}, sizes_known={sizes_known}, chunks={chunks})")
        if not (topo.shared and topo.is_uniform):
            raise ValueError("transport='gloo' needs a uniform shared link (one Link for every host)")
        return gloo.collective_time(op, topo.n, nbytes, topo.link, ALGOS[op][0] if algo is None else algo, start_s)
    steps = schedule(op, topo.n, nbytes, algo, sizes=sizes, chunks=chunks, root=root, sizes_known=sizes_known)
    return schedule_time(topo, steps, start_s)


def p2p_time(nbytes: float, net: Topo | Link, src: int = 0, dst: int = 1, start_s: float = 0.0) -> float:
    """One message alone: ``L + S/B`` (exact over traces)."""
    if isinstance(net, Link):
        return net.transfer_time(nbytes, start_s)
    return _as_topo(net, None, True).transfer_time(src, dst, nbytes, start_s)


def allreduce_time(
    nbytes: float, net: Topo | Link, n: int | None = None, algo: str = "ring", start_s: float = 0.0,
    *, shared: bool = True, chunks: int = 1, transport: str = "ideal",
) -> float:
    """ring ``2(n-1)(L + S/(nB))``; tree ``2(h+k-1)(L + c*S/(kB))``, c = 2 shared (n > 2), 1 mesh;
    doubling ``log2(n)(L + S/B)`` for n a power of two, two steps more otherwise
    (``transport="gloo"``: gloo's protocol, module docstring)."""
    return collective_time("allreduce", nbytes, net, n, algo, start_s, shared=shared, chunks=chunks,
                           transport=transport)


def reduce_scatter_time(
    nbytes: float, net: Topo | Link, n: int | None = None, algo: str = "ring", start_s: float = 0.0,
    *, shared: bool = True,
) -> float:
    """ring ``(n-1)(L + S/(nB))``."""
    return collective_time("reduce_scatter", nbytes, net, n, algo, start_s, shared=shared)


def allgather_time(
    nbytes: float, net: Topo | Link, n: int | None = None, algo: str = "ring", start_s: float = 0.0,
    *, shared: bool = True, sizes: Sequence[float] | None = None, sizes_known: bool = True,
    transport: str = "ideal",
) -> float:
    """ring ``(n-1)(L + S/B)``; direct ``L + (n-1)S/B`` shared, ``L + S/B`` mesh; doubling and bruck
    ``ceil(log2 n) L + (n-1)S/B``.

    ``sizes`` (per-rank block bytes) replaces ``nbytes`` for codecs whose payloads differ;
    ``sizes_known=False`` includes ccomm's size headers (:func:`schedule`); ``transport="gloo"``:
    gloo's protocol (module docstring)."""
    return collective_time("allgather", nbytes, net, n, algo, start_s, shared=shared, sizes=sizes,
                           sizes_known=sizes_known, transport=transport)


def broadcast_time(
    nbytes: float, net: Topo | Link, n: int | None = None, algo: str = "chain", start_s: float = 0.0,
    *, shared: bool = True, chunks: int = 1, root: int = 0,
) -> float:
    """chain ``(n-2+k)(L + S/(kB))``."""
    return collective_time("broadcast", nbytes, net, n, algo, start_s, shared=shared, chunks=chunks, root=root)


def alltoall_time(
    nbytes: float, net: Topo | Link, n: int | None = None, algo: str = "direct", start_s: float = 0.0,
    *, shared: bool = True,
) -> float:
    """direct ``L + (n-1)S/(nB)`` shared, ``L + S/(nB)`` mesh."""
    return collective_time("alltoall", nbytes, net, n, algo, start_s, shared=shared)


def barrier_time(net: Topo | Link, n: int | None = None, start_s: float = 0.0, *, shared: bool = True) -> float:
    """dissemination ``ceil(log2 n) * L`` (empty messages)."""
    return collective_time("barrier", 0.0, net, n, "dissemination", start_s, shared=shared)


def ps_time(
    nbytes: float, net: Topo | Link, n: int | None = None, start_s: float = 0.0,
    *, push: bool = True, pull: bool = True, server: int = 0, shared: bool = True,
) -> float:
    """Parameter server (one server, n-1 workers).

    push: ``L + max(max_i S/B_i, (n-1)S/B_srv)`` shared, ``max_i(L_i + S/B_i)`` mesh; pull likewise.
    """
    if not (push or pull):
        raise ValueError("ps_time needs push=True, pull=True or both")
    algo = "pushpull" if push and pull else ("push" if push else "pull")
    return collective_time("ps", nbytes, net, n, algo, start_s, shared=shared, root=server)
