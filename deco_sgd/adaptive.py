"""`AdaptiveDriver`: feeds the §4 estimators and runs the `Controller` on every rank (§3.6).

Called by `DecoOptimizer` at the end of every step (both modes). Every `measure_every`
steps it launches, on the control group and without waiting:

- one SUM and one MAX all-reduce of a small float64 vector (estimator inputs and the
  ±decision code, so MAX also yields the minimum), and
- two latency probes: a 1-element all-reduce and a 1-element all-gather, timed from launch
  to the completion callback (their Works are kept until a later exchange, see `finish`),

and waits for the previous period's ones, so control adds no round trip to the critical
path. Every rank then runs the deterministic controller on the identical reduced vector
(`decision_mode="replicated"`); a switch is scheduled for the next step, and the next
exchange checks that all ranks are running the same point (`DecoDesyncError` otherwise).

Limits of this version [ours]:
- ‖ḡ‖² (for σ²) is known only from dense aggregates (warm-up and δ = 1); later σ² keeps
  its last EMA value. The shared-coordinate sample of §4 is not implemented.
- In hook mode the time DDP blocks on the hook's futures is not measured, so T̂_comp
  includes communication waits (an over-estimate).
- `decision_mode="rank0"` is not implemented (ValueError).
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.distributed as dist

from .controller import Controller, Decision, Measurements
from .errors import DecoCommError, DecoDesyncError
from .estimators import BandwidthEstimator, ComputeTimeEstimator, GradStatsEstimator, LatencyEstimator
from .timemodel import collective_cost

if TYPE_CHECKING:
    from .exchange import StepEntry
    from .state import DecoState

__all__ = ["AdaptiveDriver"]

logger = logging.getLogger(__name__)

# Layout of the MAX vector; the SUM vector is [Σ‖g‖², ‖ḡ‖² or 0, has ‖ḡ‖²].
_T_COMP, _NEG_BW, _LAT_AR, _LAT_AG, _CODE, _NEG_CODE = range(6)
_UNKNOWN = -math.inf  # loses every MAX, so one rank's unknown never hides another's value


#: How long a probe's completion callback may lag its future (it runs on gloo's thread).
_STAMP_WAIT_S = 5.0


class _Probe:
    """A launched 1-element collective with its completion time.

    The Work itself is kept, not only its future: see `AdaptiveDriver.finish`.
    """

    __slots__ = ("work", "fut", "launch_t", "done_t")

    def __init__(self, work: Any, launch_t: float) -> None:
        self.work, self.fut, self.launch_t, self.done_t = work, work.get_future(), launch_t, None
        self.fut.add_done_callback(self.stamp)

    def stamp(self, _f: Any) -> None:
        self.done_t = time.monotonic()

    def wait(self) -> None:
        self.work.wait()
        # The future completes before gloo's thread runs its callbacks: wait for the stamp
        # as well, so no Python callback of ours is left pending on that thread.
        deadline = time.monotonic() + _STAMP_WAIT_S
        while self.done_t is None and time.monotonic() < deadline:
            time.sleep(1e-4)


class AdaptiveDriver:
    """Estimators + controller + control exchange for one `DecoState`."""

    def __init__(self, state: "DecoState") -> None:
        cfg = state.config
        if cfg.decision_mode != "replicated":
            raise ValueError(f"decision_mode: only 'replicated' is implemented, got {cfg.decision_mode!r}")
        self.state = state
        n = state.world_size
        self.controller = Controller(cfg, n, [state.params[k].numel() for k in state.names])
        self.comp = ComputeTimeEstimator(cfg.ema_comp)
        self.bw = BandwidthEstimator(cfg.ema_bandwidth, cfg.bw_min_transfer_frac)
        self.lat = LatencyEstimator(cfg.latency_window)
        self.grad = GradStatsEstimator(n, cfg.ema_grad)
        self.log: list[Decision] = []
        self._t_last: float | None = None
        self._g2_local = math.nan
        self._gbar2: float | None = None
        self._inflight: tuple[int, list[Any], torch.Tensor, torch.Tensor, list[_Probe]] | None = None
        # The last waited exchange's Works and tensors, dropped one exchange later or by finish().
        self._retired: tuple[Any, ...] | None = None

    # -- per step ---------------------------------------------------------------------------
    def on_step_end(self, applied: Sequence["StepEntry"], blocked_s: float) -> None:
        now = time.monotonic()
        if self._t_last is not None:
            self.comp.update(now - self._t_last, blocked_s)
        self._t_last = now
        n = self.state.world_size
        for e in applied:
            for u in e.units:
                if u.done_t is None:
                    continue
                pat = "allreduce" if u.collective == "allreduce" else "allgather"
                lat = self.lat.value(pat)
                if lat is None:
                    # Without L̂ the whole duration would count as transfer: a biased-low
                    # sample that later (latency-corrected) samples often cannot replace,
                    # because the transfer filter then rejects them.
                    continue
                # Bytes each worker receives (§3.2), from the shared schedule: ring all-reduce
                # 2(n−1)/n·V; all-gather (n−1)·V, whichever algorithm algo="auto" ran.
                recv = collective_cost(pat, n, u.nbytes).nbytes
                self.bw.update(recv, u.launch_t, u.done_t, lat)
            self._g2_local = sum(u.sq_norm for u in e.units)
            if all(u.codec_spec == "dense" for u in e.units) and all(u.result for u in e.units):
                self._gbar2 = sum(float(t.double().pow(2).sum()) for u in e.units for t in u.result.values())  # type: ignore[union-attr]
        step = self.state.step  # index of the next step: the one a decision would apply to
        if step % self.state.config.measure_every == 0:
            self._complete(step)
            self._launch(step)

    def _code(self) -> float:
        # Decision code: which (δ, τ) this rank runs; identical everywhere unless desynced.
        return float(self.state.ratio) * 1e3 + float(self.state.staleness) + 1.0

    def _launch(self, step: int) -> None:
        grp = self.state.control_group
        mx = torch.full((6,), _UNKNOWN, dtype=torch.float64)
        for i, v in ((_T_COMP, self.comp.value), (_NEG_BW, None if self.bw.value is None else -self.bw.value),
                     (_LAT_AR, self.lat.value("allreduce")), (_LAT_AG, self.lat.value("allgather"))):
            if v is not None:
                mx[i] = v
        mx[_CODE], mx[_NEG_CODE] = self._code(), -self._code()
        g2 = self._g2_local if math.isfinite(self._g2_local) else 0.0
        sm = torch.tensor([g2, self._gbar2 or 0.0, 1.0 if self._gbar2 is not None else 0.0,
                           1.0 if math.isfinite(self._g2_local) else 0.0], dtype=torch.float64)
        # The Works are kept, not only their futures, until a later exchange (see finish()).
        works = [dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=grp, async_op=True),
                 dist.all_reduce(sm, op=dist.ReduceOp.SUM, group=grp, async_op=True)]
        t0 = time.monotonic()
        probes = [_Probe(dist.all_reduce(torch.zeros(1), group=grp, async_op=True), t0)]
        outs = [torch.empty(1) for _ in range(self.state.world_size)]
        t1 = time.monotonic()
        probes.append(_Probe(dist.all_gather(outs, torch.zeros(1), group=grp, async_op=True), t1))
        self._inflight = (step, works, mx, sm, probes)

    def _complete(self, step: int) -> None:
        if self._inflight is None:
            return
        launched_at, works, mx, sm, probes = self._inflight
        self._inflight = None
        self._wait(works, probes, step)
        self._retired = (works, probes, mx, sm)
        for pat, p in zip(("allreduce", "allgather"), probes):
            if p.done_t is not None:
                self.lat.update(pat, p.done_t - p.launch_t)
        if mx[_CODE] != -mx[_NEG_CODE]:
            raise DecoDesyncError(
                f"step {launched_at}: ranks run different (ratio, staleness) points (codes {-float(mx[_NEG_CODE])} "
                f"to {float(mx[_CODE])})")
        n = self.state.world_size
        if sm[3] == n:  # every rank reported its gradient norm for the same step
            gbar = float(sm[1] / sm[2]) if sm[2] > 0 else None
            self.grad.update(float(sm[0]) / n, gbar)
        m = Measurements(
            t_comp=None if mx[_T_COMP] == _UNKNOWN else float(mx[_T_COMP]),
            bandwidth=None if mx[_NEG_BW] == _UNKNOWN else -float(mx[_NEG_BW]),
            latency_allreduce=None if mx[_LAT_AR] == _UNKNOWN else float(mx[_LAT_AR]),
            latency_allgather=None if mx[_LAT_AG] == _UNKNOWN else float(mx[_LAT_AG]),
            r=self.grad.r,
        )
        st = self.state
        if step < st.config.warmup_steps:
            return
        d = self.controller.decide(m, (st.ratio, st.staleness), step)
        self.log.append(d)
        if d.changed:
            st.schedule(d.ratio, d.staleness, step, reason=d.reason)

    def finish(self) -> None:
        """Wait for the in-flight control exchange and release the waited ones' Works
        (collective; call at shutdown on every rank).

        Why Works and tensors are kept one exchange past their completion, and here until
        after a barrier: a gloo worker thread holds each Work until it has run it, and
        whoever drops the last reference frees the Work and its tensors, which takes the
        GIL for a tensor Python has seen. A worker that gets there only while the
        interpreter is finalizing is ended by Python with pthread_exit, whose unwinding
        through torch's noexcept destructor aborts the process ("terminate called without
        an active exception"). Kept here, the last reference is this thread's.
        """
        if self._inflight is not None:
            _, works, mx, sm, probes = self._inflight
            self._inflight = None
            self._wait(works, probes, self.state.step)
            self._retired = (works, probes, mx, sm)
        if self._retired is not None:
            dist.barrier(group=self.state.control_group)
            self._retired = None

    def _wait(self, works: list[Any], probes: list[Any], step: int) -> None:
        """Wait for a control exchange; a failed peer becomes a DecoCommError naming the step."""
        try:
            for w in works:
                w.wait()
            for p in probes:
                p.wait()
        except RuntimeError as exc:
            raise DecoCommError(str(exc), step=step, key="control", staleness=self.state.staleness,
                                collective="allreduce") from exc

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Estimator and controller state; an in-flight control exchange is not kept (the
        resumed run starts a fresh period on every rank alike)."""
        return {"controller": self.controller.state_dict(), "comp": self.comp.state_dict(),
                "bw": self.bw.state_dict(), "lat": self.lat.state_dict(), "grad": self.grad.state_dict(),
                "log": [x.as_dict() for x in self.log]}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.controller.load_state_dict(sd["controller"])
        self.comp.load_state_dict(sd["comp"])
        self.bw.load_state_dict(sd["bw"])
        self.lat.load_state_dict(sd["lat"])
        self.grad.load_state_dict(sd["grad"])
        self._inflight = None
