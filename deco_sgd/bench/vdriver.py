"""The virtual clock of one benchmark run, as a driver and as the adaptive driver's clock
(docs/design/deco_sgd.md#virtual-time).

A `VirtualAccountant` stands in as the state's driver of a static run, or as the `clock` of
DeCo-SGD's real `AdaptiveDriver`. At the end of every step it (1) charges each exchange
unit the step launched on the `LinkTimeline` at the end of the step's compute, with the
unit's real payload bytes, its collective's pattern and the algorithm it ran, and (2)
advances the `StepClock` to max(start + T_comp, done of the entries the step applied). For
DeCo-SGD, transfer launch/done times, step durations and the latency probes (priced as tiny
collectives on the same link, without queueing behind data) are virtual; the driver never
reads the link configuration.

Every rank computes the same virtual times (payload sizes are equal on every rank), so
decisions stay replicated. The per-step log (`steps_log`) is the record `vclock.replay`
re-times on any link.
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

from ..state import DecoState
from .vclock import LinkTimeline, StepClock

__all__ = ["VirtualAccountant"]


class VirtualAccountant:
    """The virtual clock of one run, and the driver of static runs.

    As a clock (`deco_sgd.adaptive.Clock`) it charges the step's units on the link at the
    end of the step's compute and advances the `StepClock`; `AdaptiveDriver(state, clock=acct)`
    reads every timestamp from it. As a static run's driver, `on_step_end` just does that.
    """

    def __init__(self, state: DecoState, timeline: LinkTimeline, clock: StepClock) -> None:
        self.state = state
        self.timeline = timeline
        self.clock = clock
        #: Unit -> (virtual launch, virtual done); weak so applied units are freed.
        self.times: "weakref.WeakKeyDictionary[Any, tuple[float, float]]" = weakref.WeakKeyDictionary()
        self.last_blocked = 0.0
        self.log: list[Any] = []  # no decisions in static mode
        #: Per step: exchange chains and applied steps, for `vclock.replay` (see `context.run_record`).
        self.steps_log: list[dict[str, Any]] = []

    # -- Clock ------------------------------------------------------------------------------
    def end_step(self, applied: Sequence[Any], blocked_s: float) -> tuple[float, float]:
        st = self.state
        seq = st.step - 1
        launch = self.clock.launch_s
        entry = next((e for e in [*applied, *st.fifo] if e.seq == seq), None)
        chains = []
        if entry is not None:
            for u in entry.units:
                self.times[u] = (launch, self.timeline.exchange(launch, u.nbytes, u.collective, u.algo))
                chains.append([[u.nbytes, u.collective, u.algo]])
        self.steps_log.append({"x": chains, "a": [e.seq for e in applied]})
        dones = [self.times[u][1] for e in applied for u in e.units if u in self.times]
        before = self.clock.blocked
        self.clock.end_step(dones)
        self.last_blocked = self.clock.blocked - before
        return self.clock.start, self.last_blocked

    def unit_times(self, unit: Any) -> tuple[float, float] | None:
        return self.times.get(unit)

    def probe(self, pattern: str, work: Any) -> "_VProbe":
        """A control probe priced as a tiny collective on the link (never queued behind data)."""
        now = self.clock.start
        return _VProbe(work.get_future(), now, self.timeline.probe(now, pattern))

    def now(self) -> float:
        return self.clock.start

    def control(self, nbytes: float) -> None:
        """Charge a control all-reduce on the link now (it queues with data, blocks no step)."""
        self.timeline.exchange(self.clock.start, nbytes, "allreduce")
        if self.steps_log:
            self.steps_log[-1].setdefault("c", []).append(nbytes)

    # -- static driver ------------------------------------------------------------------------
    def on_step_end(self, applied: Sequence[Any], blocked_s: float) -> None:
        self.end_step(applied, blocked_s)

    def finish(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock.state_dict(), "timeline": self.timeline.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.clock.load_state_dict(sd["clock"])
        self.timeline.load_state_dict(sd["timeline"])


class _VProbe:
    """A control-group probe whose launch and completion times are virtual."""

    __slots__ = ("fut", "launch_t", "done_t")

    def __init__(self, fut: Any, launch_t: float, done_t: float) -> None:
        self.fut, self.launch_t, self.done_t = fut, launch_t, done_t

    def wait(self) -> None:
        self.fut.wait()
