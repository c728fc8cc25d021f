"""Test oracle: a deterministic discrete-event simulator of n ranks over netsim's link model.

Not part of the library (nothing in it runs this): the tests use it as a second, independent
implementation of the rules the library implements once. It replays every message of a
collective one event at a time, while :mod:`netsim.model.cost` gives closed forms
(``tests/netsim/test_cost.py``) and :mod:`netsim.emulation` replays whole schedules on
replicated state (``test_emulate.py::test_replay_agrees_with_simulator``). Agreement of the
two within float rounding is the check. It shares only the reservation rule
(:mod:`netsim.model.reserve`) and the message schedules (:func:`netsim.model.cost.schedule`)
with the code under test, not the event handling.

:class:`Simulator` runs n rank programs in one thread. A program is a generator that yields
operations (:class:`Compute`, :class:`Send`, :class:`Recv`, :class:`Isend`, :class:`Irecv`,
:class:`Wait`, :class:`Collective`) and receives back a :class:`Handle` for ``Isend``/``Irecv``
and the current virtual time otherwise. Links follow the reservation rule
(:mod:`netsim.model.reserve`); collectives replay :func:`netsim.model.cost.schedule` message by message,
a rank's step k+1 waiting for its own step-k sends to serialize and receives to arrive.

Determinism: events sit in a heap keyed (time, priority, insertion seq), where at equal
times ranks resume before links are reserved and reservations are served by (src, dst, seq)
for point-to-point and by schedule order for collectives. Nothing depends on hashing or
threads, so identical inputs give identical :class:`Timeline`s (see :meth:`Timeline.digest`).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
from collections import deque
from collections.abc import Callable, Generator, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from netsim.model.clock import VirtualClock
from netsim.model.cost import schedule
from netsim.model.reserve import Reserver
from netsim.model.topo import Topo

__all__ = [
    "Collective",
    "Compute",
    "Handle",
    "Irecv",
    "Isend",
    "Program",
    "Recv",
    "Send",
    "Simulator",
    "Timeline",
    "TimelineEvent",
    "Wait",
]

#: A run stops with an error past this many events (a program that never finishes).
MAX_EVENTS = 10_000_000


# ---------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class Compute:
    seconds: float


@dataclass(frozen=True)
class Isend:
    dst: int
    nbytes: float
    tag: Hashable = 0


@dataclass(frozen=True)
class Irecv:
    src: int
    nbytes: float | None = None
    tag: Hashable = 0


@dataclass(frozen=True)
class Send(Isend):
    """Blocking send: returns when the message has left the sender (serialized)."""


@dataclass(frozen=True)
class Recv(Irecv):
    """Blocking receive: returns when the message has arrived."""


@dataclass(frozen=True)
class Collective:
    op: str
    nbytes: float
    algo: str | None = None
    sizes: tuple[float, ...] | None = None
    chunks: int = 1
    root: int = 0


@dataclass(eq=False)
class Handle:
    """An outstanding send or receive; ``done_s`` is set when it completes."""

    rank: int
    kind: str
    peer: int
    tag: Hashable
    nbytes: float | None
    issued_s: float
    done_s: float | None = None


@dataclass(frozen=True)
class Wait:
    handles: Handle | tuple[Handle, ...]


Op = Union[Compute, Isend, Irecv, Wait, Collective]
Program = Generator[Op, Any, None]


@dataclass(frozen=True)
class TimelineEvent:
    rank: int
    kind: str  # compute | send | recv | collective
    start_s: float
    end_s: float
    peer: int | None = None
    nbytes: float = 0.0
    label: str = ""


@dataclass(frozen=True)
class Timeline:
    n: int
    events: tuple[TimelineEvent, ...]
    end_s: tuple[float, ...]
    bytes_sent: tuple[float, ...]
    bytes_received: tuple[float, ...]
    link_busy: tuple[tuple[str, float, float], ...]

    @property
    def makespan(self) -> float:
        return max(self.end_s, default=0.0)

    def rank_events(self, rank: int, kind: str | None = None) -> list[TimelineEvent]:
        return [e for e in self.events if e.rank == rank and (kind is None or e.kind == kind)]

    def busy(self, rank: int, kind: str | None = None) -> list[tuple[float, float]]:
        """Merged intervals in which ``rank`` had an event (of ``kind``) in progress."""
        spans = sorted((e.start_s, e.end_s) for e in self.rank_events(rank, kind))
        out: list[tuple[float, float]] = []
        for s, e in spans:
            if out and s <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
        return out

    def digest(self) -> str:
        """SHA-256 of a canonical dump (floats as exact hex), stable across processes."""
        def f(x: float) -> str:
            return float(x).hex()

        doc = {
            "n": self.n,
            "events": [[e.rank, e.kind, f(e.start_s), f(e.end_s), e.peer, f(e.nbytes), e.label] for e in self.events],
            "end": [f(x) for x in self.end_s],
            "sent": [f(x) for x in self.bytes_sent],
            "recv": [f(x) for x in self.bytes_received],
            "links": [[r, f(s), f(e)] for r, s, e in self.link_busy],
        }
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------- simulator
@dataclass
class _Rank:
    stack: list[Program]
    waiting: list[Handle] | None = None
    finished_s: float | None = None
    started: list[bool] = field(default_factory=list)  # per stack entry: primed yet?
    collective_enter: list[tuple[float, Collective]] = field(default_factory=list)
    ncollectives: int = 0


_RESUME, _COMPLETE, _RESERVE = 0, 1, 2


class Simulator:
    """Run n rank programs over ``topo`` in virtual time (no threads, deterministic)."""

    def __init__(self, topo: Topo, seed: int = 0) -> None:
        if not isinstance(topo, Topo):
            raise ValueError(f"topo={topo!r} must be a netsim.Topo")
        self.topo = topo
        self.seed = int(seed)

    def run(
        self, programs: Callable[[int], Program] | Sequence[Program], *, start_s: float = 0.0
    ) -> Timeline:
        """Run one program per rank (a factory called with each rank, or a sequence of n)."""
        n = self.topo.n
        gens = [programs(r) for r in range(n)] if callable(programs) else list(programs)
        if len(gens) != n:
            raise ValueError(f"need one program per rank: n={n}, got {len(gens)}")
        self._clock = VirtualClock(start_s)
        self._res = Reserver(self.topo, self.seed)
        self._heap: list[tuple[float, tuple[int, ...], int, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._ranks = [_Rank(stack=[g], started=[False]) for g in gens]
        self._sends: dict[tuple[int, int, Hashable], deque[tuple[float, float, Handle]]] = {}
        self._recvs: dict[tuple[int, int, Hashable], deque[Handle]] = {}
        self._p2p_seq: dict[tuple[int, int], int] = {}
        self._collectives: list[Collective] = []
        self._events: list[TimelineEvent] = []
        self._busy: list[tuple[str, float, float]] = []
        self._sent = [0.0] * n
        self._received = [0.0] * n
        for r in range(n):
            self._push(start_s, (_RESUME, r), ("resume", r, None))
        count = 0
        while self._heap:
            t, _prio, _s, action = heapq.heappop(self._heap)
            self._clock.advance_to(max(t, self._clock.now))
            count += 1
            if count > MAX_EVENTS:
                raise RuntimeError(f"simulation exceeded {MAX_EVENTS} events; a program may never finish")
            kind = action[0]
            if kind == "resume":
                self._drive(action[1], action[2])
            elif kind == "reserve":
                self._reserve(*action[1:])
            else:
                self._complete(action[1])
        stuck = [r for r, st in enumerate(self._ranks) if st.finished_s is None]
        if stuck:
            detail = {r: [(h.kind, h.peer, h.tag) for h in (self._ranks[r].waiting or []) if h.done_s is None] for r in stuck}
            raise RuntimeError(f"deadlock: ranks {stuck} wait forever on {detail}")
        return Timeline(
            n=n,
            events=tuple(self._events),
            end_s=tuple(st.finished_s or 0.0 for st in self._ranks),
            bytes_sent=tuple(self._sent),
            bytes_received=tuple(self._received),
            link_busy=tuple(self._busy),
        )

    def collective_times(
        self,
        op: str,
        nbytes: float,
        algo: str | None = None,
        enter_s: Sequence[float] | None = None,
        *,
        sizes: Sequence[float] | None = None,
        chunks: int = 1,
        root: int = 0,
    ) -> tuple[float, ...]:
        """When each rank finishes one collective that rank r enters at ``enter_s[r]`` (default 0).

        A shortcut for virtual-time training loops that only need the exchange's cost."""
        n = self.topo.n
        enter = [0.0] * n if enter_s is None else [float(x) for x in enter_s]
        if len(enter) != n or any(not (math.isfinite(x) and x >= 0) for x in enter):
            raise ValueError(f"enter_s must hold n={n} finite times >= 0, got {enter_s!r}")
        coll = Collective(op, nbytes, algo, tuple(sizes) if sizes is not None else None, chunks, root)
        done = [0.0] * n

        def program(r: int) -> Program:
            if enter[r] > 0:
                yield Compute(enter[r])
            done[r] = yield coll

        self.run(program)
        return tuple(done)

    # -- plumbing ------------------------------------------------------------------------
    def _push(self, t: float, prio: tuple[int, ...], action: tuple[Any, ...]) -> None:
        heapq.heappush(self._heap, (t, prio, next(self._seq), action))

    def _drive(self, r: int, value: Any) -> None:
        """Advance rank r's innermost program until it blocks."""
        st = self._ranks[r]
        now = self._clock.now
        while True:
            gen = st.stack[-1]
            try:
                if not st.started[-1]:
                    st.started[-1] = True
                    op = next(gen)
                else:
                    op = gen.send(value)
            except StopIteration:
                st.stack.pop()
                st.started.pop()
                if st.collective_enter and len(st.stack) == len(st.collective_enter):
                    enter, coll = st.collective_enter.pop()
                    self._events.append(TimelineEvent(r, "collective", enter, now, None, coll.nbytes, f"{coll.op}:{coll.algo or ''}"))
                if not st.stack:
                    st.finished_s = now
                    return
                value = now
                continue
            value = self._dispatch(r, op, now)
            if value is _BLOCKED:
                return

    def _dispatch(self, r: int, op: Any, now: float) -> Any:
        if isinstance(op, Compute):
            if not (math.isfinite(op.seconds) and op.seconds >= 0):
                raise ValueError(f"rank {r}: Compute(seconds={op.seconds!r}) must be finite and >= 0")
            self._events.append(TimelineEvent(r, "compute", now, now + op.seconds))
            self._push(now + op.seconds, (_RESUME, r), ("resume", r, now + op.seconds))
            return _BLOCKED
        if isinstance(op, (Isend, Irecv)):
            h = self._isend(r, op, now) if isinstance(op, Isend) else self._irecv(r, op, now)
            if isinstance(op, (Send, Recv)):
                return self._wait(r, (h,), now)
            return h
        if isinstance(op, Wait):
            hs = op.handles if isinstance(op.handles, tuple) else (op.handles,)
            for h in hs:
                if not isinstance(h, Handle) or h.rank != r:
                    raise ValueError(f"rank {r}: Wait needs handles this rank created, got {h!r}")
            return self._wait(r, hs, now)
        if isinstance(op, Collective):
            return self._enter_collective(r, op, now)
        raise TypeError(f"rank {r} yielded {op!r}; expected Compute, Send, Recv, Isend, Irecv, Wait or Collective")

    def _wait(self, r: int, hs: Iterable[Handle], now: float) -> Any:
        pending = [h for h in hs if h.done_s is None or h.done_s > now]
        if not pending:
            return now
        self._ranks[r].waiting = list(hs)
        return _BLOCKED

    def _isend(self, r: int, op: Isend, now: float, prio: tuple[int, ...] | None = None) -> Handle:
        if not (0 <= op.dst < self.topo.n) or op.dst == r:
            raise ValueError(f"rank {r}: send dst={op.dst} must be another rank in [0, {self.topo.n - 1}]")
        if not (math.isfinite(op.nbytes) and op.nbytes >= 0):
            raise ValueError(f"rank {r}: send nbytes={op.nbytes!r} must be finite and >= 0")
        h = Handle(r, "send", op.dst, op.tag, op.nbytes, now)
        if prio is None:  # point-to-point ties: (src, dst, seq)
            seq = self._p2p_seq.get((r, op.dst), 0)
            self._p2p_seq[(r, op.dst)] = seq + 1
            prio = (_RESERVE, 0, r, op.dst, seq)
        self._push(now, prio, ("reserve", h))
        return h

    def _irecv(self, r: int, op: Irecv, now: float) -> Handle:
        if not (0 <= op.src < self.topo.n) or op.src == r:
            raise ValueError(f"rank {r}: recv src={op.src} must be another rank in [0, {self.topo.n - 1}]")
        h = Handle(r, "recv", op.src, op.tag, op.nbytes, now)
        self._recvs.setdefault((op.src, r, op.tag), deque()).append(h)
        self._match((op.src, r, op.tag))
        return h

    def _reserve(self, h: Handle) -> None:
        now = self._clock.now
        rv = self._res.reserve(h.rank, h.peer, float(h.nbytes or 0.0), now)
        for res in self.topo.resources(h.rank, h.peer):
            self._busy.append(("-".join(str(x) for x in res), rv.start_s, rv.fin_s))
        self._sent[h.rank] += h.nbytes or 0.0
        self._push(rv.fin_s, (_COMPLETE,), ("complete", h, rv.fin_s))
        self._sends.setdefault((h.rank, h.peer, h.tag), deque()).append((rv.arr_s, float(h.nbytes or 0.0), h))
        self._match((h.rank, h.peer, h.tag))

    def _match(self, key: tuple[int, int, Hashable]) -> None:
        sends, recvs = self._sends.get(key), self._recvs.get(key)
        while sends and recvs:
            arr, nbytes, _sh = sends.popleft()
            rh = recvs.popleft()
            if rh.nbytes is not None and rh.nbytes != nbytes:
                raise ValueError(f"rank {rh.rank}: recv from {rh.peer} expected {rh.nbytes} bytes, message has {nbytes}")
            rh.nbytes = nbytes
            done = max(arr, rh.issued_s)
            self._push(done, (_COMPLETE,), ("complete", rh, done))

    def _complete(self, h: Handle) -> None:
        now = self._clock.now
        h.done_s = now
        if h.kind == "recv":
            self._received[h.rank] += h.nbytes or 0.0
        label = "" if isinstance(h.tag, tuple) else str(h.tag)
        if not (isinstance(h.tag, tuple) and h.tag and h.tag[0] == _COLL_TAG):
            self._events.append(TimelineEvent(h.rank, h.kind, h.issued_s, now, h.peer, h.nbytes or 0.0, label))
        st = self._ranks[h.rank]
        if st.waiting is not None and all(x.done_s is not None for x in st.waiting):
            st.waiting = None
            self._push(now, (_RESUME, h.rank), ("resume", h.rank, now))

    # -- collectives -----------------------------------------------------------------------
    def _enter_collective(self, r: int, op: Collective, now: float) -> Any:
        st = self._ranks[r]
        cid = st.ncollectives
        st.ncollectives += 1
        if cid == len(self._collectives):
            self._collectives.append(op)
        elif self._collectives[cid] != op:
            raise ValueError(f"rank {r}: collective #{cid} is {op!r} but another rank called {self._collectives[cid]!r}")
        steps = schedule(op.op, self.topo.n, op.nbytes, op.algo, sizes=op.sizes, chunks=op.chunks, root=op.root)
        st.collective_enter.append((now, op))
        st.stack.append(self._collective_program(r, cid, steps))
        st.started.append(False)
        return now  # the driver now runs the sub-program

    def _collective_program(self, r: int, cid: int, steps: list[list[tuple[int, int, float]]]) -> Program:
        for k, step in enumerate(steps):
            hs: list[Handle] = []
            for idx, (s, d, b) in enumerate(step):
                tag = (_COLL_TAG, cid, k)
                if s == r:
                    hs.append(self._isend(r, Isend(d, b, tag), self._clock.now, (_RESERVE, 1, cid, k, idx)))
                elif d == r:
                    hs.append(self._irecv(r, Irecv(s, b, tag), self._clock.now))
            if hs:
                yield Wait(tuple(hs))


_COLL_TAG = "__collective__"


class _Blocked:
    def __repr__(self) -> str:
        return "<blocked>"


_BLOCKED = _Blocked()
