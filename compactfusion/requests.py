"""Request boundaries: when a parallelized model starts a new generation.

Bases, step counters and per-request byte counts must be dropped between requests (a new
request's step 0 has no base and is sent raw) and never inside one: a reset inside a request
costs a raw step, shortens `handle.step`/`handle.stats` to the last segment and, unnoticed,
looks like a compression ratio collapse. Both CompactFusion handles (`parallelize` and the
xfuser adapter) decide boundaries with one `RequestTracker`:

1. **Scheduler** (preferred). `watch(obj)` wraps `set_timesteps` of a diffusers scheduler, or
   of `obj.scheduler` for a pipeline. Every diffusers pipeline call, and every hand-written
   sampling loop, calls it once before its first model call, so the next forward after it
   starts a new request, whatever the schedule looks like. A pipeline's scheduler is looked
   up again at every forward: swapping `pipe.scheduler` (between calls) is itself a boundary
   and the new scheduler is watched. While something is watched the timestep rule is off.
2. **Timestep rule** (bare transformer, nothing watched). The first forward of a request
   records its start timestep. A later forward (branch 0) starts a new request when its
   timestep is back at or above that start: samplers count down, and none of diffusers'
   schedulers returns to its first timestep within a request, while a new request starts
   from the top again. Repeated timesteps (Heun, DPM-Solver-SDE, PNDM: t1, t1, t2, t2, ...)
   and interleaved rises below the start (KDPM2-ancestral, RePaint's jumps) stay in the
   request. The old rule ("a timestep not below the previous one") reset at each of them.
3. **Suspect resets.** Ascending schedules (inversion: DDIMInverse) look like a new request
   at every call under rule 2. A timestep rise that ends a request of a single call is
   therefore counted as suspect and warned about once per tracker (with the remedy: watch
   the scheduler, or `new_request="off"` and explicit resets). Every reset is counted in
   `stats` (a `RequestStats`), which, unlike the per-request byte counters, lives as long
   as the handle.

Limits of rule 2 (use `watch` or explicit `reset()` there): a new request that starts below
the previous one's start (img2img with a lower strength, fewer steps with "leading" spacing)
continues the previous request: still correct (bases stay mirrored), only its first step is
compressed against the previous request's last K/V; the first such rise is logged at INFO.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["RequestStats", "RequestTracker", "timestep_value"]

logger = logging.getLogger(__name__)

def timestep_value(t: Any) -> Optional[float]:
    """The scalar timestep of a forward call (first element of a tensor; None if absent)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    return float(t)


@dataclass
class RequestStats:
    """Lifetime counters of one handle's request boundaries (never cleared by `reset()`).

    `requests`: requests started (the first forward after creation or after any reset
    counts one). Resets by cause: `scheduler` (a watched `set_timesteps` or scheduler swap),
    `timestep` (rule 2), `explicit` (`handle.reset()`), `shape` (`on_shape_change="reset"`);
    `suspect`: the timestep resets that looked like they fell inside one request (rule 3).
    """

    requests: int = 0
    scheduler: int = 0
    timestep: int = 0
    explicit: int = 0
    shape: int = 0
    suspect: int = 0

    @property
    def resets(self) -> int:
        return self.scheduler + self.timestep + self.explicit + self.shape


class RequestTracker:
    """Decides request boundaries for one handle (see the module docstring)."""

    __slots__ = ("rule", "stats", "_start", "_prev", "_calls", "_pending", "_pipe", "_sched", "_saved", "_warned",
                 "_noted_rise")

    def __init__(self, rule: str = "timestep") -> None:
        if rule not in ("timestep", "off"):
            raise ValueError(f"new_request={rule!r}: allowed values are timestep, off")
        self.rule = rule
        self.stats = RequestStats()
        self._start: Optional[float] = None  # first timestep of the current request
        self._prev: Optional[float] = None  # timestep of the previous branch-0 forward
        self._calls = 0  # branch-0 forwards in the current request
        self._pending = False  # a watched set_timesteps ran since the last forward
        self._pipe: Any = None
        self._sched: Any = None
        self._saved: Any = None  # (had an instance attribute, its value, our wrapper) of the watched set_timesteps
        self._warned = False
        self._noted_rise = False

    # -- watching a scheduler or pipeline ---------------------------------------------
    @property
    def watching(self) -> bool:
        return self._sched is not None

    def watch(self, obj: Any) -> None:
        """Take boundaries from `obj`: a diffusers scheduler, or a pipeline with a `.scheduler`."""
        sched = getattr(obj, "scheduler", None) if not hasattr(obj, "set_timesteps") else obj
        if sched is None or not callable(getattr(sched, "set_timesteps", None)):
            raise ValueError(f"watch: {type(obj).__name__} is neither a diffusers scheduler (set_timesteps) "
                             "nor a pipeline with a .scheduler")
        self.unwatch()
        self._pipe = None if sched is obj else obj
        self._hook(sched)

    def _hook(self, sched: Any) -> None:
        original = sched.set_timesteps
        had = "set_timesteps" in vars(sched)

        @functools.wraps(original)  # keeps the signature diffusers' retrieve_timesteps inspects
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            if self._sched is sched and self.rule != "off":
                self._pending = True
            return original(*args, **kwargs)

        sched.set_timesteps = set_timesteps
        self._sched, self._saved = sched, (had, vars(sched).get("set_timesteps"), set_timesteps)

    def unwatch(self) -> None:
        """Restore the watched `set_timesteps` (if nobody wrapped it since; else leave it inert)."""
        sched, saved = self._sched, self._saved
        self._sched = self._pipe = self._saved = None
        self._pending = False
        if sched is None:
            return
        had, old, ours = saved
        if vars(sched).get("set_timesteps") is ours:
            if had:
                sched.set_timesteps = old
            else:
                del sched.set_timesteps
        # else: wrapped again on top of ours; ours is a pass-through now (self._sched is not sched)

    # -- the decision -------------------------------------------------------------------
    def before_forward(self, t: Optional[float], branch0: bool) -> Optional[str]:
        """Call at every forward before the state counts it; returns the reset cause or None.

        The caller resets its state when a cause is returned; the forward then proceeds as
        the first call of a new request.
        """
        cause = None
        if self._pipe is not None:
            sched = getattr(self._pipe, "scheduler", None)
            if sched is not None and sched is not self._sched:  # swapped between calls
                pipe = self._pipe
                self.unwatch()
                self._pipe = pipe
                self._hook(sched)
                self._pending = True
        if self._pending:
            self._pending = False
            cause = "scheduler" if self._calls else None
        elif self.rule == "timestep" and not self.watching and branch0 and t is not None and self._start is not None:
            if t >= self._start:
                cause = "timestep"
                if t > self._start and self._calls == 1:
                    self._suspect(t)
            elif self._prev is not None and t > self._prev and not self._noted_rise:
                self._noted_rise = True
                logger.info("compactfusion: timestep rose from %g to %g, below the request's start %g: same request "
                            "(interleaved schedule); a new request starting lower needs handle.reset() or a watched "
                            "scheduler", self._prev, t, self._start)
        if cause is not None:
            branch0 = True  # the state is reset: this call is branch 0 of the new request
            setattr(self.stats, cause, getattr(self.stats, cause) + 1)
            logger.info("compactfusion: new request (%s), timestep %s", cause, t)
            self._start, self._calls = None, 0
        if branch0:
            if self._calls == 0:
                self.stats.requests += 1
                self._start = t
            self._calls += 1
            self._prev = t
        return cause

    def _suspect(self, t: float) -> None:
        self.stats.suspect += 1
        if not self._warned:
            self._warned = True
            logger.warning(
                "compactfusion: timestep %g after a request of one call at %g reset the state; if the timesteps of one "
                "request rise (an ascending/inversion schedule), every call is a raw step: pass the pipeline or call "
                "handle.watch(scheduler), or use new_request='off' with handle.reset() between requests "
                "(resets are counted in handle.requests)", t, self._start)

    def restart(self, cause: str = "explicit") -> None:
        """Record a reset the caller made (`explicit`); the next forward starts a new request."""
        setattr(self.stats, cause, getattr(self.stats, cause) + 1)
        self._start = self._prev = None
        self._calls, self._pending = 0, False

    def shape_reset(self) -> None:
        """Count a reset made for a shape change (`on_shape_change="reset"`); the request goes on."""
        self.stats.shape += 1
