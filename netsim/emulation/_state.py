"""Replicated link state for ``netsim.emulate``: who owns what, and the collective replay.

Every rank keeps a full :class:`~netsim.model.reserve.Reserver`, but each entry has one owner whose
copy is authoritative: rank r owns its uplink and downlink (shared mode) or its outgoing pairs
(mesh), the FIFO arrival times of messages *to* r, and the sequence numbers of messages *from*
r. Point-to-point messages only touch entries their sender or receiver owns. A collective
all-gathers the owners' entries, and then every rank replays the same schedule on identical
state, so the replicas agree after it.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from ..model.reserve import Reserver
from ..model.topo import Resource

__all__ = ["owned_size", "pack_owned", "unpack_owned", "CollectiveResult", "replay"]


def _owned_free(res: Reserver, r: int) -> list[Resource]:
    n = res.topo.n
    if res.topo.shared:
        return [("up", r), ("down", r)]
    return [("pair", r, j) for j in range(n) if j != r]


def owned_size(res: Reserver) -> int:
    """Floats :func:`pack_owned` writes per rank."""
    n = res.topo.n
    return len(_owned_free(res, 0)) + 2 * n


def pack_owned(res: Reserver, r: int) -> list[float]:
    """Rank r's authoritative entries, in a fixed order (free times, arrivals to r, seqs from r)."""
    n = res.topo.n
    out = [res.free.get(k, 0.0) for k in _owned_free(res, r)]
    out += [res.last_arr.get((i, r), 0.0) for i in range(n)]
    # Sequence numbers stay far below 2**53, so float64 carries them exactly.
    out += [float(res.next_seq.get((r, j), 0)) for j in range(n)]
    return out


def unpack_owned(res: Reserver, r: int, values: list[float], *, keep_later: bool = False) -> None:
    """Write rank r's entries from :func:`pack_owned` output.

    ``keep_later`` keeps a local value when it is later than the packed one; the owner uses it
    so a reservation made while a collective's state was in flight is not lost.
    """
    n = res.topo.n
    keys = _owned_free(res, r)
    if len(values) != len(keys) + 2 * n:
        raise ValueError(f"values must hold {len(keys) + 2 * n} floats for n={n}, got {len(values)}")
    it = iter(values)
    for k in keys:
        v = next(it)
        res.free[k] = max(v, res.free.get(k, 0.0)) if keep_later else v
    for i in range(n):
        v = next(it)
        res.last_arr[(i, r)] = max(v, res.last_arr.get((i, r), 0.0)) if keep_later else v
    for j in range(n):
        v = int(next(it))
        res.next_seq[(r, j)] = max(v, res.next_seq.get((r, j), 0)) if keep_later else v


@dataclass(frozen=True)
class CollectiveResult:
    """Per-rank outcome of one replayed collective (indexed by group rank)."""

    done_s: tuple[float, ...]
    bytes_sent: tuple[float, ...]
    bytes_received: tuple[float, ...]
    messages: int


def replay(res: Reserver, steps: list[list[tuple[int, int, float]]], enter_s: list[float]) -> CollectiveResult:
    """Run a step schedule through the reservation rule; returns when each rank is done.

    A rank's step k+1 messages become ready when all its step-k sends are serialized and its
    step-k receives have arrived. Messages are served in order of (ready, src, dst, step,
    index), which is first come first served; since every newly ready message is ready no
    earlier than the one just served, a heap gives that order exactly.
    """
    n = res.topo.n
    if len(enter_s) != n:
        raise ValueError(f"enter_s must have n={n} entries, got {len(enter_s)}")
    k_steps = len(steps)
    involved = [[0] * n for _ in range(k_steps)]
    for k, step in enumerate(steps):
        for s, d, _ in step:
            if not (0 <= s < n and 0 <= d < n) or s == d:
                raise ValueError(f"schedule step {k} has message ({s}, {d}); ranks must be distinct in [0, {n - 1}]")
            involved[k][s] += 1
            involved[k][d] += 1
    ready = list(enter_s)
    cur = [0] * n
    seen = [[0] * n for _ in range(k_steps)]
    acc = [[0.0] * n for _ in range(k_steps)]
    sent = [0.0] * n
    received = [0.0] * n
    heap: list[tuple[float, int, int, int, int, float]] = []

    def advance(r: int) -> None:
        # Skip steps r takes no part in, then queue its sends of the step it is now in.
        while cur[r] < k_steps and involved[cur[r]][r] == 0:
            cur[r] += 1
        if cur[r] < k_steps:
            k = cur[r]
            for idx, (s, d, b) in enumerate(steps[k]):
                if s == r:
                    heapq.heappush(heap, (ready[r], s, d, k, idx, b))

    def finish(r: int, k: int, t: float) -> None:
        acc[k][r] = max(acc[k][r], t)
        seen[k][r] += 1
        while cur[r] < k_steps and seen[cur[r]][r] == involved[cur[r]][r]:
            ready[r] = max(ready[r], acc[cur[r]][r])
            cur[r] += 1
            advance(r)

    for r in range(n):
        advance(r)
    count = 0
    first: dict[Resource, float] = {}
    busy0 = dict(res.busy_s)
    while heap:
        t, s, d, k, _idx, b = heapq.heappop(heap)
        rv = res.reserve(s, d, b, max(t, 0.0))
        for r in res.topo.resources(s, d):
            first.setdefault(r, rv.start_s)
        count += 1
        sent[s] += b
        received[d] += b
        finish(s, k, rv.fin_s)
        finish(d, k, rv.arr_s)
    if any(c < k_steps for c in cur):
        raise RuntimeError("collective replay stalled: the schedule's steps are inconsistent")
    # A later collective may use the gaps this one leaves while its hops wait for arrivals:
    # each resource is free again once this collective's bytes are through it back to back
    # (its first start + its busy time), not only after its last message. Measured on real
    # namespaces, gloo's concurrent collectives do fill those gaps (docs/deco_sgd.md, clock
    # validation); within one collective the schedule's own dependencies still hold.
    for r, t0 in first.items():
        res.free[r] = min(res.free[r], t0 + res.busy_s[r] - busy0.get(r, 0.0))
    return CollectiveResult(tuple(ready), tuple(sent), tuple(received), count)
