"""`AdaptiveDriver`: feeds the estimators and runs the `Controller` on every rank
(docs/design/deco_sgd.md#estimators, docs/design/deco_sgd.md#decisions-across-ranks).

Called by `DecoOptimizer` at the end of every step (both modes). It reads time from a
*clock* (`WallClock` by default; the benchmark passes its virtual clock), so one driver
serves real and virtual time. Every `measure_every` steps it launches, on the control group
and without waiting:

- one SUM and one MAX all-reduce of a small float64 vector (estimator inputs and the
  ±decision code, so MAX also yields the minimum), and
- two latency probes: a 1-element all-reduce and a 1-element all-gather, timed by the clock
  from launch to completion,

and waits for the previous period's ones, so control adds no round trip to the critical
path. Every rank then runs the deterministic controller on the identical reduced vector
(`decision_mode="replicated"`); a switch is scheduled for the next step, and the next
exchange checks that all ranks are running the same point (`DecoDesyncError` otherwise).

What the SUM vector carries (issue 14; `deco_sgd.convergence` uses it):

1. the loss the caller reported (`record_loss`) summed over the period's steps, and its count;
2. the raw gradient on S = `sigma_coords` coordinates every rank draws from a shared seed,
   at the period's last two steps (the coordinates are fixed within a period), their local
   squared norms, and this rank's error-feedback residual on the same coordinates after the
   first of the two steps. Summed over ranks they give ḡ_S at two consecutive steps (drift ρ,
   noise-corrected with the between-rank variance σ², hence a current r = σ²/G², and the
   signal fraction φ of ‖ḡ‖²) and the mean residual ē_S, whose projection on the later ḡ_S
   is the held-back signal D (`convergence.held_back_signal`); and per coordinate the
   rank's g_t² + g_prev², whose sum gives the per-coordinate variance behind the drift's
   confidence bounds (`convergence.drift_blocks`, `convergence.ratio_bounds`);
3. q(δ) for every δ < 1 of the grid: the (1 − δ)-quantile of |g| on `profile_coords` local
   coordinates (the energy profile), averaged over ranks; and per δ and quantized format
   (q8, q4) the relative energy error of that format's `quantize` codec on the sample's
   top-δ values (measured, not assumed: heavy-tailed values quantize badly).

Limits [ours]:
- The drift needs two samples in one period: `measure_every` ≥ 2 (with 1 it stays unknown
  and the controller uses `drift_prior`).
- In hook mode the time DDP blocks on the hook's futures is not measured, so T̂_comp
  includes communication waits (an over-estimate).
- `decision_mode="rank0"` is not implemented (ValueError).
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .controller import Controller, Decision, Measurements
from .convergence import ConvergenceInputs, drift_blocks, held_back_signal, ratio_bounds, step_curvature
from .errors import DecoCommError, DecoDesyncError
from ccomm import make_codec
from ccomm.comm.auto import set_measured

from .estimators import BandwidthEstimator, ComputeTimeEstimator, GradStatsEstimator, LatencyEstimator, shared_coords
from .config import QUANT_BITS
from .timemodel import collective_cost

if TYPE_CHECKING:
    from .exchange import StepEntry, Unit
    from .state import DecoState

__all__ = ["AdaptiveDriver", "Clock", "WallClock"]


# Layout of the MAX vector.
# _BW_UNSETTLED: 1 on a rank whose B̂ is not settled (a bound, or a young EMA), else 0; the
# MAX says whether any rank's is still converging (the minimum B̂ may come from any rank).
_T_COMP, _NEG_BW, _LAT_AR, _LAT_AG, _CODE, _NEG_CODE, _BW_UNSETTLED = range(7)
# Head of the SUM vector; the three S-coordinate samples and the quantiles follow.
_LOSS, _LOSS_N, _G2, _HAS_G2, _NG_T, _NG_P, _HAS_PAIR = range(7)
_HEAD = 7
_UNKNOWN = -math.inf  # loses every MAX, so one rank's unknown never hides another's value
_FORMAT_CODE = {"fp32": 0, "fp16": 1, "bf16": 2, "q8": 3, "q4": 4}


class Clock(Protocol):
    """Where the driver reads time: wall time (`WallClock`) or a benchmark's virtual clock."""

    def end_step(self, applied: Sequence["StepEntry"], blocked_s: float) -> tuple[float, float]:
        """Called once per step end: returns (now, seconds this step was blocked on exchanges)."""
        ...

    def unit_times(self, unit: "Unit") -> tuple[float, float] | None:
        """(launch, done) of a completed exchange unit, or None when unknown."""
        ...

    def probe(self, pattern: str, work: Any) -> Any:
        """Wrap a launched 1-element control collective: an object with wait(), launch_t, done_t."""
        ...

    def now(self) -> float:
        ...

    def control(self, nbytes: float) -> None:
        """A control all-reduce of `nbytes` per rank was launched now (virtual clocks charge it
        on the link; the wall clock has nothing to do: the real bytes take real time)."""
        ...


#: Completed exchanges kept at most while their pattern's latency is unknown.
_BW_PENDING_MAX = 64
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


class WallClock:
    """Real time: `time.monotonic()` and the completion stamps of the exchanges themselves."""

    __slots__ = ()

    def end_step(self, applied: Sequence["StepEntry"], blocked_s: float) -> tuple[float, float]:
        return time.monotonic(), blocked_s

    def unit_times(self, unit: "Unit") -> tuple[float, float] | None:
        return None if unit.done_t is None else (unit.launch_t, unit.done_t)

    def probe(self, pattern: str, work: Any) -> _Probe:
        return _Probe(work, time.monotonic())

    def now(self) -> float:
        return time.monotonic()

    def control(self, nbytes: float) -> None:
        pass


class _Sampler:
    """The shared-coordinate sample of one period and this rank's energy profile."""

    __slots__ = ("names", "offsets", "numels", "d", "s", "seed", "period", "where", "g_t", "g_prev", "e_t",
                 "e_prev", "have_t", "have_prev", "step_of_t", "prof_idx", "prof", "grid", "quant")

    def __init__(self, state: "DecoState") -> None:
        cfg = state.config
        self.names = list(state.names)
        self.numels = [state.params[n].numel() for n in self.names]
        self.offsets = dict(zip(self.names, np.cumsum([0] + self.numels[:-1]).tolist()))
        self.d = int(sum(self.numels))
        self.s = min(cfg.sigma_coords, self.d)
        self.seed = cfg.seed
        self.period = -1
        self.where: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.g_t = torch.zeros(self.s, dtype=torch.float64)
        self.g_prev = torch.zeros(self.s, dtype=torch.float64)
        self.e_t = torch.zeros(self.s, dtype=torch.float64)
        self.e_prev = torch.zeros(self.s, dtype=torch.float64)
        self.have_t = self.have_prev = False
        self.step_of_t = -1
        self.grid = sorted(d for d in cfg.ratio_grid if d < 1.0)
        k = min(cfg.profile_coords, self.d)
        rng = np.random.default_rng([cfg.seed, 7919, state.rank])
        self.prof_idx = self._split(np.sort(rng.choice(self.d, size=k, replace=False)))
        self.prof: dict[str, list[torch.Tensor]] = {}
        #: The quantized formats of the search and their codecs (the ones the chain appends).
        self.quant = {v: make_codec(f"quantize:bits={QUANT_BITS[v]}") for v in (cfg.value_formats or ())
                      if v in QUANT_BITS}

    def _split(self, coords: np.ndarray) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for n, numel in zip(self.names, self.numels):
            off = self.offsets[n]
            lo, hi = np.searchsorted(coords, [off, off + numel])
            if hi > lo:
                out[n] = (torch.from_numpy(np.arange(lo, hi)), torch.from_numpy(coords[lo:hi] - off))
        return out

    def begin(self, step: int, period: int) -> None:
        if period != self.period:
            self.period = period
            self.where = self._split(shared_coords(self.d, self.s, self.seed + 104729, period))
            self.have_t = self.have_prev = False
        if step != self.step_of_t:
            if self.have_t and step == self.step_of_t + 1:
                self.g_prev, self.have_prev = self.g_t.clone(), True
                self.e_prev = self.e_t.clone()
            else:
                self.have_prev = False
            self.g_t.zero_()
            self.e_t.zero_()
            self.have_t = False
            self.step_of_t = step
            self.prof = {}

    def observe(self, names: Sequence[str], grads: Sequence[torch.Tensor], residual: Any) -> None:
        for n, g in zip(names, grads):
            flat = g.detach().reshape(-1)
            if n in self.where:
                pos, idx = self.where[n]
                self.g_t[pos] = flat[idx].double()
                r = residual(n)
                if r is not None:
                    self.e_t[pos] = r.reshape(-1)[idx].double()
            if n in self.prof_idx:
                self.prof.setdefault("g", []).append(flat[self.prof_idx[n][1]].float())
        self.have_t = True

    def _sample(self) -> torch.Tensor | None:
        parts = self.prof.get("g")
        if not parts:
            return None
        a = torch.cat(parts)
        a = a[torch.isfinite(a)]
        return a if a.numel() else None

    def quantiles(self) -> list[float]:
        a = self._sample()
        if a is None:
            return [0.0] * len(self.grid)
        q = torch.quantile(a.abs(), torch.tensor([1.0 - d for d in self.grid], dtype=a.dtype))
        return [float(x) for x in q]

    def quant_errors(self) -> list[float]:
        """Per δ of the grid and quantized format: the relative energy error of that format's
        codec on the sample's top-δ values (signed, in sample order: as the chain sees them)."""
        a = self._sample()
        out = []
        for d in self.grid:
            for v, codec in self.quant.items():
                if a is None:
                    out.append(0.0)
                    continue
                k = max(1, int(math.ceil(d * a.numel())))
                idx = torch.sort(a.abs().topk(k).indices).values
                x = a[idx]
                e = codec.decode(codec.encode(x)) - x
                out.append(float(e @ e) / max(float(x @ x), 1e-30))
        return out


class AdaptiveDriver:
    """Estimators + controller + control exchange for one `DecoState`."""

    def __init__(self, state: "DecoState", clock: Clock | None = None) -> None:
        cfg = state.config
        if cfg.decision_mode != "replicated":
            raise ValueError(f"decision_mode: only 'replicated' is implemented, got {cfg.decision_mode!r}")
        self.state = state
        self.clock: Clock = WallClock() if clock is None else clock
        n = state.world_size
        self.controller = Controller(cfg, n, [state.params[k].numel() for k in state.names])
        self.comp = ComputeTimeEstimator(cfg.ema_comp)
        self.bw = BandwidthEstimator(cfg.ema_bandwidth, cfg.bw_min_transfer_frac)
        self.lat = LatencyEstimator(cfg.latency_window)
        self.grad = GradStatsEstimator(n, cfg.ema_grad)
        self.log: list[Decision] = []
        #: Clock time of every evaluated decision (same order as `log`).
        self.log_t: list[float] = []
        self.sampler = _Sampler(state)
        # EMAs of the convergence inputs (numerator and denominator apart: ratios of EMAs are steadier).
        # The drift's numerator and denominator also per block of the sample ("*_b", lists),
        # for its confidence bounds.
        self.conv: dict[str, Any] = {"drift2": None, "signal2": None, "gbar2": None, "gap_num": None,
                                     "gap_den": None, "drift2_b": None, "signal2_b": None}
        self.gap_point: tuple[float, str] | None = None
        #: The latest gap read at each point run so far, (δ, v) -> D
        #: (`convergence.predicted_gap` combines them).
        self.gaps: dict[tuple[float, str], float] = {}
        #: The staleness the drift EMAs were measured under; when τ changes they restart
        #: (a delay changes the drift a direction shows). The step curvature read at the old
        #: τ (`curvature_prev`) stands in until the new τ has a sample, and bounds it from below
        #: for as many samples as the EMA's memory (1/ema_grad): sharpness does not fall the
        #: moment τ does, and one fresh sample is noisier than the old average.
        self.drift_tau: int | None = None
        self.curvature_prev: float | None = None
        self.drift_samples = 0
        self.quantiles: dict[float, float] | None = None
        #: (δ, q8/q4) -> measured relative energy error of that quantizer on top-δ values.
        self.quant_errors: dict[tuple[float, str], float] | None = None
        self._loss_sum = 0.0
        self._loss_n = 0
        #: Measurements of the first informed decision and of the latest one (for reports).
        self.first_informed: Measurements | None = None
        self.last_measurements: Measurements | None = None
        self._t_last: float | None = None
        self._g2_local = math.nan
        self._inflight: tuple[int, list[Any], torch.Tensor, torch.Tensor, list[Any], tuple[float, str, int]] | None = None
        #: Completed exchanges waiting for their pattern's latency (`_feed_bandwidth`).
        self._bw_pending: deque[tuple[str, float, str, float, float]] = deque()
        # The last waited exchange's Works and tensors, dropped one exchange later or by finish().
        self._retired: tuple[Any, ...] | None = None

    # -- per step ---------------------------------------------------------------------------
    def record_loss(self, loss: float) -> None:
        """This rank's training loss of the step (optional; feeds the progress monitor)."""
        x = float(loss)
        if math.isfinite(x):
            self._loss_sum += x
            self._loss_n += 1

    def observe_launch(self, names: Sequence[str], grads: Sequence[torch.Tensor]) -> None:
        """`DecoState.launch` calls this after each unit: sample g and the residual."""
        st = self.state
        self.sampler.begin(st.step, st.step // st.config.measure_every)
        self.sampler.observe(names, grads, st.ef.residual)

    def on_step_end(self, applied: Sequence["StepEntry"], blocked_s: float) -> None:
        now, blocked = self.clock.end_step(applied, blocked_s)
        if self._t_last is not None:
            self.comp.update(now - self._t_last, blocked)
        self._t_last = now
        for e in applied:
            for u in e.units:
                times = self.clock.unit_times(u)
                if times is None:
                    continue
                pat = "allreduce" if u.collective == "allreduce" else "allgather"
                self._bw_pending.append((pat, float(u.nbytes), u.algo, times[0], times[1]))
            self._g2_local = sum(u.sq_norm for u in e.units)
        self._feed_bandwidth()
        step = self.state.step  # index of the next step: the one a decision would apply to
        if step % self.state.config.measure_every == 0:
            k = len(self.log)
            self._complete(step)
            self._launch(step)
            self.log_t.extend([now] * (len(self.log) - k))

    def _feed_bandwidth(self) -> None:
        """Feed the completed exchanges to B̂ in completion order, each once its pattern's
        latency L̂ is known.

        Without L̂ the whole duration would count as transfer: a biased-low sample that later
        (latency-corrected) samples often cannot replace. The exchanges of the first steps,
        before the first probe has completed, wait here instead of being dropped, so the first
        informed decision does not wait for exchanges made after the first probe.
        """
        n = self.state.world_size
        while self._bw_pending:
            pat, nbytes, algo, t0, t1 = self._bw_pending[0]
            lat = self.lat.value(pat)
            if lat is None:
                # Keep the order (the estimator takes completions in order); bounded, so a
                # pattern that is never probed cannot grow the queue without end.
                while len(self._bw_pending) > _BW_PENDING_MAX:
                    self._bw_pending.popleft()
                return
            self._bw_pending.popleft()
            # Bytes each worker receives and latency hops, from the schedule the exchange
            # ran (ccomm.schedule); the probe is the backend's ring, so scale L̂ by hops.
            size = collective_cost(pat, n, nbytes, algo)
            if algo != "ring":
                lat *= size.latency_hops / max(1, collective_cost(pat, n, nbytes).latency_hops)
            self.bw.update(size.nbytes, t0, t1, lat)

    def _code(self) -> float:
        # Decision code: which (δ, τ, v) this rank runs; identical everywhere unless desynced.
        st = self.state
        return float(st.ratio) * 1e3 + float(st.staleness) + 1.0 + 1e4 * _FORMAT_CODE.get(st.values, 9)

    def _launch(self, step: int) -> None:
        grp = self.state.control_group
        mx = torch.full((7,), _UNKNOWN, dtype=torch.float64)
        for i, v in ((_T_COMP, self.comp.value), (_NEG_BW, None if self.bw.value is None else -self.bw.value),
                     (_LAT_AR, self.lat.value("allreduce")), (_LAT_AG, self.lat.value("allgather"))):
            if v is not None:
                mx[i] = v
        mx[_CODE], mx[_NEG_CODE] = self._code(), -self._code()
        mx[_BW_UNSETTLED] = 0.0 if self.bw.settled else 1.0
        sp = self.sampler
        # The sample belongs to the steps just closed (step − 2 and step − 1) only if both ran.
        pair = sp.have_t and sp.have_prev and sp.step_of_t == step - 1
        head = torch.zeros(_HEAD, dtype=torch.float64)
        head[_LOSS], head[_LOSS_N] = self._loss_sum, self._loss_n
        ok = math.isfinite(self._g2_local)
        head[_G2], head[_HAS_G2] = (self._g2_local if ok else 0.0), (1.0 if ok else 0.0)
        if pair:
            head[_NG_T], head[_NG_P], head[_HAS_PAIR] = float(sp.g_t @ sp.g_t), float(sp.g_prev @ sp.g_prev), 1.0
        nqe = len(sp.grid) * len(sp.quant)
        quant = torch.tensor((sp.quantiles() + sp.quant_errors()) if sp.have_t else [0.0] * (len(sp.grid) + nqe),
                             dtype=torch.float64)
        z = torch.zeros(sp.s, dtype=torch.float64)
        # Per coordinate g_t² + g_prev²: summed over ranks, the per-coordinate between-rank
        # variance, from which the drift's confidence bounds come (convergence.drift_blocks).
        sq = sp.g_t * sp.g_t + sp.g_prev * sp.g_prev if pair else z
        # float32 on the wire: 4·S + 7 + 3·|grid \ {1}| values, 32.9 KB per period at S = 2048.
        sm = torch.cat([head, quant, sp.g_t if pair else z, sp.g_prev if pair else z, sp.e_prev if pair else z,
                        sq]).float()
        self._loss_sum, self._loss_n = 0.0, 0
        # Only futures are kept: a Work object still alive when the user destroys the
        # process group aborts the process at exit.
        # The Works are kept, not only their futures, until a later exchange (see finish()).
        works = [dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=grp, async_op=True),
                 dist.all_reduce(sm, op=dist.ReduceOp.SUM, group=grp, async_op=True)]
        self.clock.control(float(mx.numel() * mx.element_size() + sm.numel() * sm.element_size()))
        probes = [self.clock.probe("allreduce", dist.all_reduce(torch.zeros(1), group=grp, async_op=True))]
        outs = [torch.empty(1) for _ in range(self.state.world_size)]
        probes.append(self.clock.probe("allgather", dist.all_gather(outs, torch.zeros(1), group=grp, async_op=True)))
        # The point the sample was taken under (a decision of this step-end applies later).
        self._inflight = (step, works, mx, sm, probes,
                          (float(self.state.ratio), self.state.values, int(self.state.staleness)))

    def _ema(self, key: str, x: float) -> None:
        old = self.conv[key]
        a = self.state.config.ema_grad
        self.conv[key] = x if old is None else old + a * (x - old)

    def _absorb(self, sm: torch.Tensor, point: tuple[float, str, int]) -> None:
        """Update the convergence inputs from a reduced SUM vector (identical on every rank)."""
        sm = sm.double()
        n = self.state.world_size
        sp = self.sampler
        nq = len(sp.grid)
        q = sm[_HEAD:_HEAD + nq] / n
        if nq and float(q.max()) > 0:
            self.quantiles = {d: float(v) for d, v in zip(sp.grid, q.tolist())}
            qe = (sm[_HEAD + nq:_HEAD + nq + nq * len(sp.quant)] / n).tolist()
            fm = list(sp.quant)
            self.quant_errors = {(d, fm[j]): float(qe[i * len(fm) + j]) for i, d in enumerate(sp.grid)
                                 for j in range(len(fm))}
        nq += nq * len(sp.quant)
        if sm[_HAS_G2] == n:
            self._update_r(sm, n)
        if sm[_HAS_PAIR] != n or n < 2:
            return
        base = _HEAD + nq
        gt = sm[base:base + sp.s] / n
        gp = sm[base + sp.s:base + 2 * sp.s] / n
        eb = sm[base + 2 * sp.s:base + 3 * sp.s] / n
        sq = sm[base + 3 * sp.s:base + 4 * sp.s]
        mean_sq = float(sm[_NG_T] + sm[_NG_P]) / (2 * n)  # mean_i ‖g_i,S‖² over both steps
        gbar_sq = 0.5 * (float(gt @ gt) + float(gp @ gp))
        sigma2 = max(0.0, n / (n - 1) * (mean_sq - gbar_sq))  # per-worker sampling variance
        signal2 = gbar_sq - sigma2 / n
        diff = gt - gp
        drift2 = max(0.0, float(diff @ diff) - 2 * sigma2 / n)
        if signal2 > 0:
            if self.drift_tau is not None and point[2] != self.drift_tau:
                self.curvature_prev = self._curvature()
                self.drift_samples = 0
                for key in ("drift2", "signal2", "gbar2", "drift2_b", "signal2_b"):
                    self.conv[key] = None
            self.drift_tau = point[2]
            self.drift_samples += 1
            self._ema("drift2", drift2)
            self._ema("signal2", signal2)
            self._ema("gbar2", gbar_sq)
            num, den = drift_blocks(gt.numpy(), gp.numpy(), sq.numpy(), n)
            self._ema_blocks("drift2_b", num)
            self._ema_blocks("signal2_b", den)
        if point[0] < 1.0 and signal2 > 0:
            if self.gap_point != point[:2]:  # a new point: its gap starts afresh
                self.conv["gap_num"] = self.conv["gap_den"] = None
                self.gap_point = (point[0], point[1])
            # The held-back signal: ē_{t−1} projected on ḡ_t (`convergence.held_back_signal`).
            num, den = held_back_signal(eb.numpy(), gt.numpy(), signal2)
            self._ema("gap_num", num)
            self._ema("gap_den", den)

    def _ema_blocks(self, key: str, x: np.ndarray) -> None:
        old = self.conv.get(key)
        a = self.state.config.ema_grad
        self.conv[key] = [float(v) for v in (x if old is None else np.asarray(old) + a * (x - np.asarray(old)))]

    def _gap(self) -> float | None:
        """The held-back signal D read at `gap_point`, kept in `gaps` as that point's latest.

        The latest reading, not the largest: keeping the largest while a point's residual was
        still building up (about 1/δ steps, 200 at δ = 0.005) made one peak reading stand for
        the rest of the run (full-size varying_bandwidth, seed 0: D = 15.8 at δ = 0.005)."""
        c, gp = self.conv, self.gap_point
        if c["gap_num"] is None or not c["gap_den"] or c["gap_den"] <= 0 or gp is None:
            return None
        gap = max(0.0, c["gap_num"] / c["gap_den"])
        self.gaps[gp] = gap
        return gap

    def _drift_bounds(self) -> tuple[float, float] | None:
        """(low, high) of ρ at `drift_tau` from the block EMAs (`convergence.ratio_bounds`)."""
        num, den = self.conv.get("drift2_b"), self.conv.get("signal2_b")
        if num is None or den is None:
            return None
        b = ratio_bounds(np.asarray(num), np.asarray(den))
        return None if b is None else (b[1], b[2])

    def _update_r(self, sm: torch.Tensor, n: int) -> None:
        # r = σ²/G² from the shared sample when both steps were sampled, else G² only.
        sp = self.sampler
        base = _HEAD + len(sp.grid) * (1 + len(sp.quant))
        if sm[_HAS_PAIR] == n:
            gt = sm[base:base + sp.s] / n
            self.grad.update(float(sm[_NG_T]) / n, float(gt @ gt))
        else:
            self.grad.update(float(sm[_G2]) / n, None)

    def _drift(self) -> float | None:
        c = self.conv
        if c["drift2"] is not None and c["signal2"]:
            return math.sqrt(c["drift2"] / c["signal2"])
        return None

    def _curvature(self) -> float | None:
        """The step curvature behind the drift EMAs (`convergence.step_curvature`)."""
        drift = self._drift()
        if drift is None or self.drift_tau is None:
            return self.curvature_prev
        a = step_curvature(drift, self.drift_tau)
        if self.curvature_prev is not None and self.drift_samples * self.state.config.ema_grad < 1.0:
            return max(a, self.curvature_prev)
        return a

    def measurements(self, mx: torch.Tensor, loss: float | None) -> Measurements:
        """The controller's inputs after a completed control exchange."""
        c = self.conv
        drift, drift_tau = self._drift(), self.drift_tau or 0
        bounds = self._drift_bounds() if drift is not None else None
        lo, hi = (None, None) if bounds is None else (min(bounds[0], drift), max(bounds[1], drift))
        if self.curvature_prev is not None:
            # A curvature reads as the drift at τ = 0 (the old τ's stands in or bounds, above).
            curv = self._curvature()
            if curv is not None and (drift is None or curv > step_curvature(drift, drift_tau)):
                if hi is not None:
                    hi = max(curv, step_curvature(hi, drift_tau))
                    lo = min(curv, step_curvature(lo, drift_tau))
                drift, drift_tau = curv, 0
        gap = self._gap()
        signal = None
        if c["signal2"] is not None and c.get("gbar2"):
            signal = min(1.0, max(0.0, c["signal2"] / c["gbar2"]))
        gp = self.gap_point
        return Measurements(
            t_comp=None if mx[_T_COMP] == _UNKNOWN else float(mx[_T_COMP]),
            bandwidth=None if mx[_NEG_BW] == _UNKNOWN else -float(mx[_NEG_BW]),
            bandwidth_settled=bool(mx[_BW_UNSETTLED] == 0.0),
            latency_allreduce=None if mx[_LAT_AR] == _UNKNOWN else float(mx[_LAT_AR]),
            latency_allgather=None if mx[_LAT_AG] == _UNKNOWN else float(mx[_LAT_AG]),
            r=self.grad.r, loss=loss,
            conv=ConvergenceInputs(drift, gap, None if gp is None else gp[0], "fp32" if gp is None else gp[1],
                                   self.quantiles, signal, self.quant_errors, drift_tau, lo, hi, dict(self.gaps)))

    def _complete(self, step: int) -> None:
        if self._inflight is None:
            return
        launched_at, works, mx, sm, probes, point = self._inflight
        self._inflight = None
        self._wait(works, probes, step)
        self._retired = (works, probes, mx, sm)
        for pat, p in zip(("allreduce", "allgather"), probes):
            if p.done_t is not None:
                self.lat.update(pat, p.done_t - p.launch_t)
        self._feed_bandwidth()
        if mx[_CODE] != -mx[_NEG_CODE]:
            raise DecoDesyncError(
                f"step {launched_at}: ranks run different (ratio, staleness) points (codes {-float(mx[_NEG_CODE])} "
                f"to {float(mx[_CODE])})")
        st = self.state
        self._absorb(sm, point)
        loss = float(sm[_LOSS].double() / sm[_LOSS_N].double()) if sm[_LOSS_N] > 0 else None
        m = self.measurements(mx, loss)
        link = m.link(st.world_size)
        if link is not None and st.config.collective_algo == "auto":
            # The same replicated link on every rank, so `algo="auto"` picks alike everywhere
            # and the controller's time model prices the algorithm that will run.
            set_measured(st.group, link[0], link[1])
        if step < st.config.warmup_steps:
            return
        d = self.controller.decide(m, (st.ratio, st.staleness, st.values), step)
        self.log.append(d)
        self.last_measurements = m
        if self.first_informed is None and d.w is not None:
            self.first_informed = m
        if d.changed:
            st.schedule(d.ratio, d.staleness, step, reason=d.reason, values=d.values)

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
            _, works, mx, sm, probes, _ = self._inflight
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
                "log": [x.as_dict() for x in self.log], "convergence": self.convergence_state_dict()}

    def convergence_state_dict(self) -> dict[str, Any]:
        """The measured convergence inputs (issue 14), kept apart from the estimators
        (docs/design/deco_sgd.md#estimators)."""
        return {"conv": dict(self.conv), "gap_point": None if self.gap_point is None else list(self.gap_point),
                "gaps": [[d, v, g] for (d, v), g in self.gaps.items()],
                "drift_tau": self.drift_tau, "curvature_prev": self.curvature_prev,
                "drift_samples": self.drift_samples,
                "quantiles": None if self.quantiles is None else [[k, v] for k, v in self.quantiles.items()],
                "loss": [self._loss_sum, self._loss_n]}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.controller.load_state_dict(sd["controller"])
        self.comp.load_state_dict(sd["comp"])
        self.bw.load_state_dict(sd["bw"])
        self.lat.load_state_dict(sd["lat"])
        self.grad.load_state_dict(sd["grad"])
        if "convergence" in sd:
            c = sd["convergence"]
            self.conv = dict(c["conv"])
            self.gap_point = None if c["gap_point"] is None else (float(c["gap_point"][0]), str(c["gap_point"][1]))
            self.drift_tau, self.curvature_prev = c.get("drift_tau"), c.get("curvature_prev")
            self.gaps = {(float(d), str(v)): float(g) for d, v, g in c.get("gaps", ())}
            self.drift_samples = int(c.get("drift_samples", 0))
            self.quantiles = None if c["quantiles"] is None else {float(k): float(v) for k, v in c["quantiles"]}
            self._loss_sum, self._loss_n = float(c["loss"][0]), int(c["loss"][1])
        self._inflight = None
        # Exchanges still waiting for their latency are dropped, not kept: their times are
        # the saving process's clock readings, which mean nothing to the resumed one's.
        self._bw_pending.clear()
