"""gloo's TCP transport on a link: when each message of a collective really leaves.

The ideal transport of :mod:`netsim.model.cost` (and of every virtual clock built on it) sends
a message as soon as its sender has it. gloo's TCP transport, the CPU backend of
torch.distributed, does not: a receiver announces every receive it posts to the sender, and
the sender writes a message only once the matching announcement has arrived. This module
replays gloo's own programs message by message under that rule
(docs/netsim.md#gloos-transport-transportgloo):

1. **Rendezvous.** A receive posted by rank R for a message from S sends S a "recv ready"
   notice of `NOTICE_BYTES`. A send posted by S to R leaves when it is posted *and* a notice
   from R is waiting for it (per ordered pair, first in, first out); otherwise it waits for
   the next notice. A posted send also announces itself with a notice of the same size.
2. **Completion.** A send completes (gloo's ``waitSend`` returns) when it leaves: the bytes
   are handed to a socket buffer sized for them. A receive completes when the last byte has
   arrived: when the sender's uplink has carried it plus one one-way latency.
3. **Uplinks.** Each rank's uplink carries everything the rank sends, data and notices, first
   in first out at the link's rate (trace exact): a notice waits behind data already queued
   there, as in a FIFO bottleneck queue. Downlinks and per-message CPU time are not modeled.
4. **Programs** (what gloo posts and waits for, from gloo's sources):

   * ring all-reduce (``gloo::allreduce``, algorithm ring): the buffer is cut into
     ``numSegments = roundUp(max(ceil(S / 1 MiB), 2n), n)`` segments; a reduce-scatter then an
     all-gather phase of ``numSegments - numSegments/n + 2`` iterations each, where
     iteration i first waits for the receive and the send of iteration i-2 and then posts
     iteration i's receive (from rank+1) and send (to rank-1): two segments in flight;
   * ring all-gather (``gloo::allgather``): each block is sent as two halves, 2(n-1)
     iterations; from the third on, each waits for the oldest send and receive before
     posting the next send (to rank+1) and receive (from rank-1);
   * point-to-point rounds (`ccomm.comm`'s log-depth collectives over
     ``batch_isend_irecv``): every round posts all its sends and receives at once and waits
     for all of them.

Where a receiver posts its receive as its neighbour becomes ready to send (every ring step,
every point-to-point round), the notice costs one more one-way latency per step, unless data
still serialising on the sender's uplink hides it. `collective_time` gives the duration;
`exposed_latency_s` the part of it that is not serialisation of the bytes one rank receives,
which is what a link timeline charges as latency.

NCCL pre-posts its receive buffers and grants credits ahead, so it has no such exchange per
message; it cannot be measured on this CPU host, and `netsim.model.cost`'s ideal transport
stays the model for it.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ccomm import schedule as ccs

from .link import HEADER_BYTES, Link

__all__ = [
    "MAX_SEGMENT_BYTES",
    "NOTICE_BYTES",
    "OPS",
    "Action",
    "collective_time",
    "exposed_latency_s",
    "program",
    "simulate",
]

#: Bytes of one notice on the wire: gloo's 48-byte operation preamble plus IPv4 and TCP headers.
NOTICE_BYTES = 48 + HEADER_BYTES
#: gloo's largest all-reduce segment (``AllreduceOptions::kMaxSegmentSize``, 1 MiB).
MAX_SEGMENT_BYTES = 1 << 20
#: Ops and the algorithms modeled for them ("ring" is gloo's own collective; the others are
#: `ccomm.comm`'s log-depth rounds over gloo's point-to-point messages).
OPS: dict[str, tuple[str, ...]] = {"allreduce": ("ring", "doubling", "tree"),
                                   "allgather": ("ring", "doubling", "bruck")}
_ELEMENT_BYTES = 4  # float32: gloo's segments are whole elements


@dataclass(frozen=True)
class Action:
    """One step of a rank's program: post a send or a receive (`op` id, `peer`, bytes) or
    wait for the completion of earlier ops (`ops`)."""

    kind: str  # "send" | "recv" | "wait"
    op: int = -1
    peer: int = -1
    nbytes: float = 0.0
    ops: tuple[int, ...] = ()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _ring_allreduce(n: int, nbytes: float) -> list[list[Action]]:
    total = _round_up(math.ceil(nbytes), _ELEMENT_BYTES)
    if total == 0:
        return [[] for _ in range(n)]
    num = _round_up(max(-(-total // MAX_SEGMENT_BYTES), 2 * n), n)
    per_rank = num // n
    seg = _round_up(-(-total // num), _ELEMENT_BYTES)
    span = num * seg
    progs: list[list[Action]] = []
    for r in range(n):
        prog: list[Action] = []
        ids = iter(range(1 << 30))
        # (send offset base, receive offset base) of the two phases, in segments
        for send_base, recv_base in (((r + 1) * per_rank, (r + 2) * per_rank), (r * per_rank, (r + 1) * per_rank)):
            posted: dict[int, tuple[int, int]] = {}  # iteration -> (recv op, send op), -1 if none
            for i in range(num - per_rank + 2):
                if i >= 2:
                    rv, sd = posted.pop(i - 2)
                    wait = tuple(x for x in (rv, sd) if x >= 0)
                    if wait:
                        prog.append(Action("wait", ops=wait))
                if i < num - per_rank:
                    s_len = min(seg, total - ((send_base + i) * seg) % span)
                    r_len = min(seg, total - ((recv_base + i) * seg) % span)
                    rv = sd = -1
                    if r_len > 0:
                        rv = next(ids)
                        prog.append(Action("recv", rv, (r + 1) % n, float(r_len)))
                    if s_len > 0:
                        sd = next(ids)
                        prog.append(Action("send", sd, (r - 1) % n, float(s_len)))
                    posted[i] = (rv, sd)
        progs.append(prog)
    return progs


def _ring_allgather(n: int, nbytes: float) -> list[list[Action]]:
    block = math.ceil(nbytes)
    if block == 0:
        return [[] for _ in range(n)]
    halves = (float(block // 2), float(block - block // 2))
    progs: list[list[Action]] = []
    for r in range(n):
        prog: list[Action] = []
        sends: deque[int] = deque()
        recvs: deque[int] = deque()
        for i in range(2 * (n - 1)):
            if i >= 2:
                prog.append(Action("wait", ops=(sends.popleft(), recvs.popleft())))
            sends.append(2 * i)
            recvs.append(2 * i + 1)
            prog.append(Action("send", 2 * i, (r + 1) % n, halves[i & 1]))
            prog.append(Action("recv", 2 * i + 1, (r - 1) % n, halves[i & 1]))
        prog.append(Action("wait", ops=tuple(sends) + tuple(recvs)))
        progs.append(prog)
    return progs


def _rounds(n: int, steps: ccs.Schedule) -> list[list[Action]]:
    progs: list[list[Action]] = [[] for _ in range(n)]
    nxt = [0] * n
    for step in steps:
        mine: list[list[int]] = [[] for _ in range(n)]
        for src, dst, b in step:
            for rank, kind, peer in ((src, "send", dst), (dst, "recv", src)):
                op = nxt[rank]
                nxt[rank] += 1
                progs[rank].append(Action(kind, op, peer, float(b)))
                mine[rank].append(op)
        for rank in range(n):
            if mine[rank]:
                progs[rank].append(Action("wait", ops=tuple(mine[rank])))
    return progs


def program(op: str, n: int, nbytes: float, algo: str = "ring") -> list[list[Action]]:
    """Every rank's program of `op` (``nbytes``: each rank's input) by `algo` (module docstring)."""
    if op not in OPS:
        raise ValueError(f"op={op!r} must be one of {sorted(OPS)}")
    if algo not in OPS[op]:
        raise ValueError(f"algo={algo!r} must be one of {OPS[op]} for op={op!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    if not (math.isfinite(nbytes) and nbytes >= 0):
        raise ValueError(f"nbytes={nbytes!r} must be finite and >= 0")
    if n == 1:
        return [[]]
    if algo == "ring":
        return _ring_allreduce(n, nbytes) if op == "allreduce" else _ring_allgather(n, nbytes)
    if op == "allreduce":
        return _rounds(n, ccs.allreduce_schedule(algo, n, float(nbytes)))
    return _rounds(n, ccs.allgather_schedule(algo, n, [float(nbytes)] * n))


class _Uplink:
    """One rank's uplink: first in, first out at the link's rate."""

    __slots__ = ("link", "free")

    def __init__(self, link: Link, start_s: float) -> None:
        self.link = link
        self.free = start_s

    def carry(self, t: float, nbytes: float) -> float:
        start = max(t, self.free)
        d = self.link.serialization_time(nbytes, start)
        if not math.isfinite(d):
            raise ValueError(f"trace: a message sent at t={start:.3f} s never completes (zero bandwidth to the "
                             "end of a non-repeating trace)")
        self.free = start + d
        return self.free


def simulate(programs: Sequence[Sequence[Action]], link: Link, start_s: float = 0.0, *,
             notices_queue: bool = True) -> list[float]:
    """When each rank finishes its program, all starting at `start_s` (rules 1-3 of the module docstring).

    ``notices_queue=False`` lets every notice leave at once instead of behind the data its
    sender has queued (rule 3): TCP keeps at most a window of a message in the network, so
    large messages measured between the two (docs/netsim.md#gloos-transport-transportgloo)."""
    if not isinstance(link, Link):
        raise ValueError(f"link: must be a netsim.Link, got {type(link).__name__}")
    if not (math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s={start_s!r} must be finite and >= 0")
    n = len(programs)
    lat = link.latency_s
    up = [_Uplink(link, start_s) for _ in range(n)]
    pc = [0] * n
    done_at: list[dict[int, float]] = [{} for _ in range(n)]  # rank -> op -> completion time
    notices: dict[tuple[int, int], int] = {}  # (sender, receiver) -> notices not yet used
    queued: dict[tuple[int, int], deque[tuple[int, float]]] = {}  # (sender, receiver) -> sends waiting
    expect: dict[tuple[int, int], deque[int]] = {}  # (sender, receiver) -> receiver's posted recv ops
    events: list[tuple[float, int, str, int, int, int]] = []  # (t, seq, kind, a, b, op)
    seq = 0
    finish = [start_s] * n

    def push(t: float, kind: str, a: int, b: int, op: int = -1) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, a, b, op))
        seq += 1

    def depart(t: float, src: int, dst: int, op: int, nbytes: float) -> None:
        done_at[src][op] = t
        push(up[src].carry(t, nbytes) + lat, "data", src, dst)
        push(t, "wake", src, -1)

    def run(rank: int, t: float) -> None:
        prog = programs[rank]
        while pc[rank] < len(prog):
            a = prog[pc[rank]]
            if a.kind == "wait":
                if any(op not in done_at[rank] for op in a.ops):
                    return
                t = max([t, *(done_at[rank][op] for op in a.ops)])
            elif a.kind == "recv":
                expect.setdefault((a.peer, rank), deque()).append(a.op)
                arrive = (up[rank].carry(t, NOTICE_BYTES) if notices_queue
                          else t + link.serialization_time(NOTICE_BYTES, t)) + lat
                push(arrive, "notice", rank, a.peer)
            elif a.kind == "send":
                if notices_queue:
                    up[rank].carry(t, NOTICE_BYTES)  # gloo announces the send too
                key = (rank, a.peer)
                if notices.get(key, 0) > 0:
                    notices[key] -= 1
                    depart(t, rank, a.peer, a.op, a.nbytes)
                else:
                    queued.setdefault(key, deque()).append((a.op, a.nbytes))
            else:
                raise ValueError(f"action kind={a.kind!r} must be send, recv or wait")
            pc[rank] += 1
        finish[rank] = max(finish[rank], t)

    for r in range(n):
        run(r, start_s)
    while events:
        t, _, kind, a, b, _op = heapq.heappop(events)
        if kind == "notice":  # from receiver a to sender b
            key = (b, a)
            q = queued.get(key)
            if q:
                op, nbytes = q.popleft()
                depart(t, b, a, op, nbytes)
            else:
                notices[key] = notices.get(key, 0) + 1
        elif kind == "data":  # last byte of a message from a arrived at b
            op = expect[(a, b)].popleft()
            done_at[b][op] = t
            run(b, t)
        else:  # "wake": a send of rank a completed
            run(a, t)
    stuck = [r for r in range(n) if pc[r] < len(programs[r])]
    if stuck:
        raise ValueError(f"programs deadlock: ranks {stuck} wait for messages nobody sends")
    return finish


def collective_time(op: str, n: int, nbytes: float, link: Link, algo: str = "ring", start_s: float = 0.0) -> float:
    """Duration of `op` (``nbytes``: each rank's input) by `algo` over gloo on n ranks sharing `link`
    (one uplink per rank), from `start_s` until the last rank has finished."""
    if not isinstance(link, Link):
        raise ValueError(f"link: must be a netsim.Link, got {type(link).__name__}")
    if link.trace is None:  # a constant rate: the same at any start
        return _constant_time(op, n, float(nbytes), algo, link.bandwidth_mbps, link.latency_ms, link.loss)
    return max(simulate(program(op, n, nbytes, algo), link, start_s)) - start_s


@functools.lru_cache(maxsize=4096)
def _constant_time(op: str, n: int, nbytes: float, algo: str, mbps: float, latency_ms: float, loss: float) -> float:
    return max(simulate(program(op, n, nbytes, algo), Link(mbps, latency_ms, loss=loss), 0.0))


def exposed_latency_s(op: str, n: int, nbytes: float, link: Link, algo: str = "ring", start_s: float = 0.0) -> float:
    """`collective_time` minus the serialisation, from `start_s`, of the bytes one rank receives
    by the ideal schedule (`ccomm.schedule.cost_terms`): the latency gloo's protocol leaves
    exposed, the counterpart of the ideal transport's hops x one-way latency."""
    steps = (ccs.allreduce_schedule(algo, n, float(nbytes)) if op == "allreduce"
             else ccs.allgather_schedule(algo, n, [float(nbytes)] * n))
    v, _ = ccs.cost_terms(steps) if n > 1 else (0.0, 0)
    return collective_time(op, n, nbytes, link, algo, start_s) - link.serialization_time(v, start_s)
