"""The DeCo-SGD `Controller`: choose (δ, τ) from measurements (design §3.5, §3.6) [ours].

Pure logic: no I/O, no collectives, no clocks. Every rank runs it on the same all-reduced
measurements and gets the same answer.

Scoring one candidate (δ, τ) under measurements m:

1. V(δ) and the pattern come from :mod:`deco_sgd.timemodel` (dense all-reduce at δ = 1);
   T_tx = V/B̂, L_eff = the measured latency of that pattern's tiny collective;
2. T_iter(δ,τ) from the time model, N(δ,τ) from the LUT (below), W = N·T_iter;
3. a non-finite N (e.g. Φ ``reported`` at δ = 1, which is 0/0) makes W = +inf, so the
   candidate can never win: the guard behind the config's ``reported`` restriction.

The LUT holds N over ratio_grid × {0..τ_max}; it depends on r = σ²/G² only and is rebuilt
when r moves by more than `lut_rebuild_threshold` (10%) from the r it was built with. An
unknown r counts as 0, the choice that penalises staleness and compression most.

`search`: for δ in descending order and τ = 0..min(τ_min(δ), τ_max), keep the first strict
minimum of W, so ties go to the larger δ, then the smaller τ.

`decide(m, current, step)`:

1. hold during warm-up and in static mode;
2. trigger: the first call after warm-up, every `decide_every` steps since the last
   decision, or when B̂ or any L̂ moved more than `change_threshold` from the values of the
   last decision (unknown values never trigger);
3. hold when T̂_comp or B̂ has never been measured (no transfer has passed the estimator's
   filter yet), or when no candidate is finite because a latency is unknown; fall back to
   (min δ, τ_max) with a warning when B̂ is 0 (a measured outage) or no candidate is finite otherwise
   (§3.5), at once (nothing can be scored, so neither hysteresis nor dwell applies). The
   design note also falls back on an unknown B̂; we hold instead, because at the first
   decision after a short warm-up "unknown" means "not measured yet", not an outage;
4. otherwise keep the current point if it is the best ("optimal"), else rescore it and
   switch only if W_best < (1 − hysteresis)·W_current
   and `min_dwell_steps` have passed since the last switch;
5. the measurements of an evaluated decision become the reference of the change trigger,
   except after a dwell hold: the trigger stays armed until the switch can happen.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import DecoConfig
from .surrogate import FitResult, SurrogateParams, fit_surrogate, iterations
from .timemodel import MessageSize, message_size, pattern_for, t_iter, tau_min

__all__ = [
    "Measurements",
    "Score",
    "Decision",
    "Controller",
    "fit_surrogate",
    "FitResult",
    "TIE_RTOL",
    "TIMEOUT_FACTOR",
]

logger = logging.getLogger(__name__)

#: W values within this relative distance are ties (float noise must not break tie rules).
TIE_RTOL = 1e-12
#: timeout_s should be at least this many times the slowest modelled exchange (§7).
TIMEOUT_FACTOR = 10

# Measured latency key per exchange pattern.
_LAT_KEY = {"allreduce_dense": "allreduce", "allreduce_sparse": "allreduce", "allgather": "allgather"}


def _known(x: float | None, allow_zero: bool) -> float | None:
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        return None
    return x


@dataclass(frozen=True)
class Measurements:
    """Estimator outputs after the cross-rank reduction; None (or a bad number) means unknown.

    bandwidth in bytes/s (0 = outage), latencies in s (L_eff of a 1-element all-reduce and
    all-gather), t_comp in s per step, r = σ²/G².
    """

    t_comp: float | None = None
    bandwidth: float | None = None
    latency_allreduce: float | None = None
    latency_allgather: float | None = None
    r: float | None = None

    def __post_init__(self) -> None:
        # Non-finite or negative numbers become None; 0 is a real bandwidth (outage) and a
        # real latency (simulated links), but never a real compute time.
        object.__setattr__(self, "t_comp", _known(self.t_comp, allow_zero=False))
        object.__setattr__(self, "bandwidth", _known(self.bandwidth, allow_zero=True))
        object.__setattr__(self, "latency_allreduce", _known(self.latency_allreduce, allow_zero=True))
        object.__setattr__(self, "latency_allgather", _known(self.latency_allgather, allow_zero=True))
        object.__setattr__(self, "r", _known(self.r, allow_zero=True))

    def latency(self, pattern: str) -> float | None:
        return getattr(self, "latency_" + _LAT_KEY[pattern])


@dataclass(frozen=True)
class Score:
    """Prediction for one (δ, τ): W = n_iter·t_iter, and that δ's τ_min."""

    ratio: float
    staleness: int
    w: float
    t_iter: float
    n_iter: float
    tau_min: int


@dataclass(frozen=True)
class Decision:
    """Outcome of `Controller.decide`, with the inputs it used (the decision log entry)."""

    step: int
    ratio: float
    staleness: int
    changed: bool
    trigger: str  # warmup | static | none | initial | period | bandwidth_change | latency_change
    outcome: str  # hold | optimal | switch | hysteresis | dwell | unknown_compute | unknown_bandwidth | unknown_latency | fallback
    bandwidth: float | None
    latency: float | None
    t_comp: float | None
    r: float | None
    w: float | None  # predicted W of the chosen point (None when nothing was scored)
    w_current: float | None

    @property
    def reason(self) -> str:
        return f"{self.trigger}:{self.outcome}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able log entry (no NaN: unknown values are None)."""
        out = dataclasses.asdict(self)
        out["reason"] = self.reason
        return out


class Controller:
    """Deterministic (δ, τ) controller for n workers and parameter tensors of sizes `numels`."""

    def __init__(self, cfg: DecoConfig, n_workers: int, numels: Sequence[int]) -> None:
        if not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers: must be an integer >= 1, got {n_workers!r}")
        self.numels = tuple(int(x) for x in numels)
        if not self.numels or any(x < 0 for x in self.numels) or sum(self.numels) == 0:
            raise ValueError("numels: need at least one parameter tensor with elements, all sizes >= 0")
        self.cfg = cfg
        self.n = n_workers
        self.exchange = cfg.exchange_pattern
        self.params = SurrogateParams.from_config(cfg)
        self.grid = tuple(sorted(cfg.ratio_grid, reverse=True))
        self._sizes: dict[float, MessageSize] = {}
        self._lut: dict[tuple[float, int], float] = {}
        self._lut_r: float | None = None
        self._last_step: int | None = None
        self._last_switch: int | None = None
        self._last_bw: float | None = None
        self._last_lat: dict[str, float | None] = {"allreduce": None, "allgather": None}

    # -- model --------------------------------------------------------------------------
    def size(self, delta: float) -> MessageSize:
        if delta not in self._sizes:
            pat = pattern_for(self.exchange, delta)
            self._sizes[delta] = message_size(pat, self.n, self.numels, delta, self.cfg.value_bytes)
        return self._sizes[delta]

    def lut(self, r: float | None) -> dict[tuple[float, int], float]:
        """N over the grid, rebuilt when r moved more than the threshold since the last build."""
        r = 0.0 if r is None else r
        r0 = self._lut_r
        stale = r0 is None or (abs(r - r0) > self.cfg.lut_rebuild_threshold * r0 if r0 > 0 else r != r0)
        if stale:
            self._build_lut(r)
        return self._lut

    def _build_lut(self, r: float) -> None:
        taus = range(self.cfg.tau_max + 1)
        self._lut = {(d, t): iterations(self.params, d, t, r, self.n) for d in self.grid for t in taus}
        self._lut_r = r
        bad = sorted(k for k, v in self._lut.items() if not math.isfinite(v))
        if bad:
            logger.warning("surrogate N is not finite at %d grid points (excluded), e.g. %s", len(bad), bad[:3])

    def score(self, m: Measurements, delta: float, tau: int, n_iter: float | None = None) -> Score:
        """Predicted W, T_iter, N for (δ, τ); W = inf when an input is unknown or N is not finite."""
        if n_iter is None:
            n_iter = iterations(self.params, delta, tau, 0.0 if m.r is None else m.r, self.n)
        size = self.size(delta)
        lat = m.latency(pattern_for(self.exchange, delta))
        if m.t_comp is None or lat is None or m.bandwidth is None or (m.bandwidth == 0 and size.nbytes > 0):
            return Score(delta, tau, math.inf, math.inf, n_iter, 0)
        t_tx = size.nbytes / m.bandwidth if size.nbytes > 0 else 0.0
        ti = t_iter(m.t_comp, t_tx, lat, tau)
        w = n_iter * ti if math.isfinite(n_iter) else math.inf
        return Score(delta, tau, w, ti, n_iter, tau_min(m.t_comp, t_tx, lat))

    def comm_time(self, m: Measurements, delta: float) -> float:
        """Modelled T_comm(δ) = L_eff + V/B̂ of one exchange (inf when B̂ or L̂ is unknown or B̂ = 0)."""
        size = self.size(delta)
        lat = m.latency(pattern_for(self.exchange, delta))
        if lat is None or m.bandwidth is None or (m.bandwidth == 0 and size.nbytes > 0):
            return math.inf
        return lat + (size.nbytes / m.bandwidth if size.nbytes > 0 else 0.0)

    def timeout_ok(self, m: Measurements) -> bool:
        """False (and a warning) when timeout_s < 10× the slowest modelled exchange over the grid (§7).

        Unknown inputs give no verdict (True): the model cannot say anything yet.
        """
        worst = max(self.comm_time(m, d) for d in self.grid)
        if not math.isfinite(worst) or self.cfg.timeout_s >= TIMEOUT_FACTOR * worst:
            return True
        logger.warning("timeout_s=%g is below %d x the slowest modelled exchange (%.3g s); a slow but "
                       "healthy exchange may be reported as a dead peer", self.cfg.timeout_s, TIMEOUT_FACTOR, worst)
        return False

    def search(self, m: Measurements) -> Score | None:
        """argmin of W over the candidates of §3.3/§3.5, or None when none is finite."""
        table = self.lut(m.r)
        best: Score | None = None
        for d in self.grid:
            first = self.score(m, d, 0, table[(d, 0)])
            for t in range(min(first.tau_min, self.cfg.tau_max) + 1):
                s = first if t == 0 else self.score(m, d, t, table[(d, t)])
                if math.isfinite(s.w) and (best is None or s.w < best.w * (1 - TIE_RTOL)):
                    best = s
        return best

    # -- policy -------------------------------------------------------------------------
    def _trigger(self, m: Measurements, step: int) -> str:
        if self._last_step is None:
            return "initial"
        if step - self._last_step >= self.cfg.decide_every:
            return "period"
        thr = self.cfg.change_threshold
        if m.bandwidth is not None and _moved(self._last_bw, m.bandwidth, thr):
            return "bandwidth_change"
        for key, old in self._last_lat.items():
            new = getattr(m, "latency_" + key)
            if new is not None and _moved(old, new, thr):
                return "latency_change"
        return "none"

    def decide(self, m: Measurements, current: tuple[float, int], step: int) -> Decision:
        """One decision at `step` given the (δ, τ) in force; see the module docstring."""
        cur_d, cur_t = float(current[0]), int(current[1])

        def out(trigger: str, outcome: str, d: float, t: int, w: float | None = None,
                wc: float | None = None) -> Decision:
            lat = m.latency(pattern_for(self.exchange, d))
            changed = (d, t) != (cur_d, cur_t)
            return Decision(step, d, t, changed, trigger, outcome, m.bandwidth, lat, m.t_comp, m.r, w, wc)

        if step < self.cfg.warmup_steps:
            return out("warmup", "hold", cur_d, cur_t)
        if self.cfg.mode == "static":
            return out("static", "hold", cur_d, cur_t)
        trigger = self._trigger(m, step)
        if trigger == "none":
            return out(trigger, "hold", cur_d, cur_t)
        if m.t_comp is None:
            return out(trigger, "unknown_compute", cur_d, cur_t)
        if m.bandwidth is None:  # not remembered: the trigger stays armed until B̂ exists
            return out(trigger, "unknown_bandwidth", cur_d, cur_t)
        best = None if not m.bandwidth else self.search(m)
        if best is None and m.bandwidth:
            needed = {pattern_for(self.exchange, d) for d in self.grid}
            if any(m.latency(p) is None for p in needed):
                return out(trigger, "unknown_latency", cur_d, cur_t)  # not an outage: wait
        if best is None:
            d, t = min(self.grid), self.cfg.tau_max
            logger.warning("step %d: no finite candidate (bandwidth=%s); falling back to ratio=%g staleness=%d",
                           step, m.bandwidth, d, t)
            self._remember(m, step)
            if (d, t) != (cur_d, cur_t):
                self._last_switch = step
            return out(trigger, "fallback", d, t)
        # The LUT's N where the current point is on the grid, so both sides use the same r.
        w_cur = self.score(m, cur_d, cur_t, self._lut.get((cur_d, cur_t))).w
        if (best.ratio, best.staleness) == (cur_d, cur_t):
            self._remember(m, step)
            return out(trigger, "optimal", cur_d, cur_t, best.w, w_cur)
        if not best.w < (1 - self.cfg.hysteresis) * w_cur:
            self._remember(m, step)
            return out(trigger, "hysteresis", cur_d, cur_t, best.w, w_cur)
        if self._last_switch is not None and step - self._last_switch < self.cfg.min_dwell_steps:
            # Not remembered: the trigger stays armed, so the switch happens as soon as the
            # dwell time is over instead of waiting for the next period.
            return out(trigger, "dwell", cur_d, cur_t, best.w, w_cur)
        self._remember(m, step)
        self._last_switch = step
        logger.info("step %d (%s): switch to ratio=%g staleness=%d, W %.4g -> %.4g",
                    step, trigger, best.ratio, best.staleness, w_cur, best.w)
        return out(trigger, "switch", best.ratio, best.staleness, best.w, w_cur)

    def _remember(self, m: Measurements, step: int) -> None:
        self._last_step = step
        self._last_bw = m.bandwidth
        self._last_lat = {"allreduce": m.latency_allreduce, "allgather": m.latency_allgather}

    # -- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "last_switch": self._last_switch,
            "last_bandwidth": self._last_bw,
            "last_latency": dict(self._last_lat),
            "lut_r": self._lut_r,
            "n_workers": self.n,
            "numels": list(self.numels),
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("n_workers") != self.n or list(sd.get("numels", ())) != list(self.numels):
            raise ValueError("state_dict: saved for a different world size or parameter layout")
        self._last_step = sd["last_step"]
        self._last_switch = sd["last_switch"]
        self._last_bw = sd["last_bandwidth"]
        self._last_lat = {"allreduce": sd["last_latency"]["allreduce"], "allgather": sd["last_latency"]["allgather"]}
        self._lut_r = None
        if sd["lut_r"] is not None:
            self._build_lut(float(sd["lut_r"]))


def _moved(old: float | None, new: float, thr: float) -> bool:
    """True when `new` differs from `old` by more than thr·old (or `old` was unknown or 0)."""
    if old is None or old == 0:
        return new != old
    return abs(new - old) > thr * old
