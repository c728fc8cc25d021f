"""Virtual time of a benchmark run: one shared link timeline and the step-start rule
(docs/design/deco_sgd.md#virtual-time).

Two small objects, both pure bookkeeping (no torch, no processes), so the real-time mode can
use them to predict what a real run should take:

`LinkTimeline(link, world)` charges data exchanges on the scenario's `netsim.Link` (its
trace included) in launch order:

1. the pattern's cost comes from the schedule of the algorithm the exchange runs
   (`deco_sgd.timemodel.collective_cost`, i.e. `ccomm.schedule`): V = bytes one rank
   receives, hops = number of schedule steps, L_eff = hops · one-way latency. All-reduce is
   the ring (V = 2(n−1)/n·S, 2(n−1) hops); the all-gather of S-byte blocks is what
   ``algo="auto"`` picks on this link (its mean rate): V = (n−1)·S with n−1 hops (ring) or
   ⌈log2 n⌉ hops (recursive doubling / Bruck);
2. tx_start = max(launch, link_free): one message at a time on the link;
3. done = tx_start + L_eff + serialisation of V bytes under the trace from tx_start
   (`Trace.time_to_send`, exact over piecewise-constant rates and outages);
4. link_free = done − L_eff: the next message may serialise while this one's latency runs.

`LinkTimeline(link, world, transport="gloo")` charges step 3 by gloo's protocol instead
(`netsim.cost.collective_time(..., transport="gloo")`, `netsim.model.gloo`: a message leaves
only once its receiver's "recv ready" notice has arrived): done = tx_start + the replayed
duration of the collective from tx_start, and still link_free = tx_start + serialisation of
V. The real-time check on real namespaces charges it, since gloo carried those exchanges;
the benchmark keeps the ideal transport (the default, the clock of every published number).

`probe(launch, pattern)` prices a tiny control collective the same way but without taking
the link (control traffic runs on its own group and is never queued behind data).

`StepClock(t_comp)` implements the step-start rule: step s computes during
[start_s, start_s + T_comp] and launches its exchange at start_s + T_comp; the next step
starts at max(start_s + T_comp, done of every entry step s applied). Entries that are still
in flight (staleness τ > 0) do not hold the next step back, which is the whole point of τ.

Example (hand-checkable numbers in tests/deco_sgd/test_bench_vclock.py)::

    tl = LinkTimeline(Link(8.0, 50.0), world=2)   # 8 Mbit/s = 1 MB/s, 50 ms one way
    clock = StepClock(0.1)
    done = tl.exchange(clock.launch_s, 1_000_000, "allreduce")   # V = 1 MB, 2 hops
    clock.end_step([done])                          # 0.1 + 1.0 + 0.1 = 1.2 s

`replay(steps, link, world, t_comp)` re-times a recorded run: each step lists its exchange
chains (a chain's exchanges depend on each other; chains of one step are launched together
at the end of its compute), the steps whose exchanges it applied and, optionally, each
rank's compute time. Runs whose payloads do not depend on the network (every static method)
can so be timed on any scenario, and a real-time run's recorded schedule can be timed on the
link it ran on (`realtime.predict_virtual`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ccomm.comm.auto import auto_config
from ccomm.schedule import choose
from netsim import Link, cost

from ..timemodel import collective_cost

__all__ = ["PATTERNS", "TRANSPORTS", "PatternCost", "pattern_cost", "LinkTimeline", "StepClock", "Transfer", "replay"]


#: Exchange patterns the timeline understands (netsim.model.cost op names).
PATTERNS = ("allreduce", "allgather")
#: Transport profiles a timeline can charge (`netsim.cost.TRANSPORTS`): "ideal" or "gloo".
TRANSPORTS = cost.TRANSPORTS


@dataclass(frozen=True)
class PatternCost:
    """Bytes one rank receives (V) and how many one-way latencies one exchange costs."""

    nbytes: float
    hops: int


@functools.lru_cache(maxsize=4096)
def pattern_cost(pattern: str, world: int, nbytes: float, algo: str = "ring") -> PatternCost:
    """V and hops of one exchange of `pattern` by `algo` (see the module docstring, step 1).

    `nbytes` is each rank's input: the tensor for all-reduce, the own block for all-gather.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: must be one of {list(PATTERNS)}, got {pattern!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world: must be an integer >= 1, got {world!r}")
    if not (math.isfinite(nbytes) and nbytes >= 0):
        raise ValueError(f"nbytes: must be finite and >= 0, got {nbytes!r}")
    size = collective_cost(pattern, world, float(nbytes), algo)
    return PatternCost(size.nbytes, size.latency_hops)


@dataclass(frozen=True)
class Transfer:
    """One charged exchange (for logs and plots)."""

    launch_s: float
    tx_start_s: float
    done_s: float
    nbytes: float  # each rank's input
    received: float  # V
    pattern: str


class LinkTimeline:
    """Charges exchanges on one link in launch order; see the module docstring."""

    def __init__(self, link: Link, world: int, *, keep_log: bool = False, transport: str = "ideal") -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport: must be one of {list(TRANSPORTS)}, got {transport!r}")
        if not isinstance(link, Link):
            raise ValueError(f"link: must be a netsim.Link, got {type(link).__name__}")
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            raise ValueError(f"world: must be an integer >= 1, got {world!r}")
        self.link = link
        self.world = world
        self.transport = transport
        self.link_free = 0.0
        self.bytes_received = 0.0
        self.keep_log = keep_log
        self.log: list[Transfer] = []

    def latency(self, pattern: str) -> float:
        """L_eff of `pattern`: hops · one-way latency."""
        return pattern_cost(pattern, self.world, 0.0).hops * self.link.latency_s

    def _serialise(self, received: float, start_s: float) -> float:
        d = self.link.serialization_time(received, start_s)
        if not math.isfinite(d):
            raise ValueError(f"trace: a transfer started at t={start_s:.3f} s never completes (zero bandwidth "
                             "to the end of a non-repeating trace)")
        return d

    def apriori_link(self) -> tuple[float, float] | None:
        """(one-way latency s, mean rate B/s) of the link, None when it never sends: what a
        static run is told (`ccomm.comm.auto.set_measured`) so `algo="auto"` picks like `algo()`."""
        trace = self.link.rate_trace
        mbps = trace.mean_mbps() if len(trace.times_s) > 1 else self.link.rate_bps(0.0) / 1e6
        return (self.link.latency_s, mbps * 1e6 / 8.0) if mbps > 0 else None

    def algo(self, pattern: str, nbytes: float) -> str:
        """The exchange's algorithm: the ring for all-reduce, ``algo="auto"``'s pick for all-gather."""
        link = self.apriori_link()
        if pattern != "allgather" or link is None:
            return "ring"  # (a link that never sends: nothing to choose between)
        return choose("allgather", self.world, float(nbytes), link[0], link[1], min_gain=auto_config().min_gain)

    def exchange(self, launch_s: float, nbytes: float, pattern: str, algo: str | None = None) -> float:
        """Charge one exchange launched at `launch_s`; returns its completion time.

        `algo` is the algorithm the exchange ran (recorded by the transport); None charges
        what ``algo="auto"`` would pick on this link (`algo()`)."""
        if not (math.isfinite(launch_s) and launch_s >= 0):
            raise ValueError(f"launch_s: must be finite and >= 0, got {launch_s!r}")
        algo = self.algo(pattern, nbytes) if algo is None else algo
        pc = pattern_cost(pattern, self.world, float(nbytes), algo)
        tx_start = max(launch_s, self.link_free)
        ser = self._serialise(pc.nbytes, tx_start)
        if self.transport == "gloo":
            done = tx_start + cost.collective_time(pattern, float(nbytes), self.link, self.world, algo, tx_start,
                                                   transport="gloo")
        else:
            done = tx_start + pc.hops * self.link.latency_s + ser
        self.link_free = tx_start + ser  # = done - L_eff: the next exchange may serialise meanwhile
        self.bytes_received += pc.nbytes
        if self.keep_log:
            self.log.append(Transfer(launch_s, tx_start, done, float(nbytes), pc.nbytes, pattern))
        return done

    def probe(self, launch_s: float, pattern: str, nbytes: float = 4.0) -> float:
        """Completion time of a tiny control collective launched at `launch_s` (link not taken)."""
        if self.transport == "gloo":
            return launch_s + cost.collective_time(pattern, float(nbytes), self.link, self.world, "ring", launch_s,
                                                   transport="gloo")
        pc = pattern_cost(pattern, self.world, float(nbytes))
        return launch_s + pc.hops * self.link.latency_s + self._serialise(pc.nbytes, launch_s)

    def true_bandwidth(self, t: float) -> float:
        """The link's rate at time t in bytes/s (for plots only; estimators never see it)."""
        return self.link.rate_bps(t) / 8.0

    def state_dict(self) -> dict[str, Any]:
        return {"link_free": self.link_free, "bytes_received": self.bytes_received}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.link_free = float(sd["link_free"])
        self.bytes_received = float(sd["bytes_received"])


class StepClock:
    """The step-start rule (docs/design/deco_sgd.md#virtual-time) with a fixed compute time per step."""

    def __init__(self, t_comp: float, start_s: float = 0.0) -> None:
        if not (isinstance(t_comp, (int, float)) and math.isfinite(t_comp) and t_comp > 0):
            raise ValueError(f"t_comp: must be a finite number > 0, got {t_comp!r}")
        if not (math.isfinite(start_s) and start_s >= 0):
            raise ValueError(f"start_s: must be finite and >= 0, got {start_s!r}")
        self.t_comp = float(t_comp)
        self.start = float(start_s)
        self.steps = 0
        #: Total time steps waited on exchanges (start delayed past start + T_comp).
        self.blocked = 0.0

    @property
    def launch_s(self) -> float:
        """When the open step's exchange is launched: the end of its compute."""
        return self.start + self.t_comp

    def end_step(self, applied_done: Iterable[float] = ()) -> float:
        """Close the open step; returns (and moves to) the next step's start time."""
        ready = self.launch_s
        nxt = max([ready, *applied_done])
        self.blocked += nxt - ready
        self.start = nxt
        self.steps += 1
        return nxt

    def state_dict(self) -> dict[str, Any]:
        return {"t_comp": self.t_comp, "start": self.start, "steps": self.steps, "blocked": self.blocked}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.t_comp, self.start = float(sd["t_comp"]), float(sd["start"])
        self.steps, self.blocked = int(sd["steps"]), float(sd["blocked"])


def replay(steps: Sequence[Mapping[str, Any]], link: Link, world: int, t_comp: float,
           start_s: float = 0.0, *, transport: str = "ideal") -> list[float]:
    """Step end times of a recorded run on `link`: element s is when step s+1 may start.

    Each record is ``{"x": [[[nbytes, pattern(, algo)], ...], ...], "a": [applied step indices]}``
    (steps counted from 0), optionally with

    - ``"c": [nbytes, ...]``: control all-reduces launched when the next step starts, which
      take the link but block no step;
    - ``"t": [compute s, ...]``: each rank's compute time of this step (default `t_comp` on
      one rank). Every rank keeps its own `StepClock`; a step's exchanges are launched when
      the last rank has finished computing, and a step ends when its slowest rank does. A
      slow rank so delays the others only where they wait for its exchange.

    An item without an algorithm is charged what ``algo="auto"`` picks on `link`
    (`LinkTimeline.algo`). The clocks start at `start_s` (the trace time of the first step);
    the times returned are on the same axis. `transport` is the timeline's (`LinkTimeline`):
    "gloo" where gloo really carried the exchanges. The rules are those of `LinkTimeline` and
    `StepClock`: the benchmark (`runner.retime`) and the real-time check
    (`realtime.predict_virtual`) both time runs with this one function.
    """
    tl = LinkTimeline(link, world, transport=transport)
    first = steps[0].get("t") if steps else None
    ranks = 1 if first is None else len(first)
    clocks = [StepClock(t_comp, start_s=start_s) for _ in range(ranks)]
    done: list[float] = []
    starts: list[float] = []
    for s, rec in enumerate(steps):
        comp = rec.get("t")
        if comp is not None:
            if len(comp) != ranks:
                raise ValueError(f"steps[{s}].t: compute times for {len(comp)} ranks, expected {ranks}")
            for clock, c in zip(clocks, comp):
                clock.t_comp = float(c)
        launch = max(c.launch_s for c in clocks)
        end = launch
        for chain in rec["x"]:
            d = launch
            for item in chain:  # [nbytes, pattern] or [nbytes, pattern, algo]
                d = tl.exchange(d, float(item[0]), str(item[1]), None if len(item) < 3 else str(item[2]))
            end = max(end, d)
        done.append(end)
        applied = [int(a) for a in rec["a"]]
        if any(a > s or a < 0 for a in applied):
            raise ValueError(f"steps[{s}].a: applied steps must be in [0, {s}], got {applied}")
        starts.append(max(c.end_step([done[a] for a in applied]) for c in clocks))
        for nbytes in rec.get("c", ()):
            tl.exchange(starts[-1], float(nbytes), "allreduce")
    return starts
