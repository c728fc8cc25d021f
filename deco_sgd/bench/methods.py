"""The benchmark's method table: one rank's training run of any method
(docs/design/deco_sgd.md#baselines, docs/design/deco_sgd.md#virtual-time).

`run_method(ctx, spec)` trains one `plan.RunSpec` on this rank. `deco` (adaptive), `dsgd`
(δ = 1, τ = 0), the static top-k grid, `static_apriori` and `cocktail` run here, through
`DecoState` + `DecoOptimizer` (wrapper mode) on gloo, with a `vdriver.VirtualAccountant`
keeping virtual time: as the driver of static runs, and as the clock of the real
`AdaptiveDriver` for `deco` (same estimators, same controller, same control all-reduces).
`dga` and `powersgd_r*` are the baselines of `baselines`.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from ccomm.comm.auto import set_measured

from ..adaptive import AdaptiveDriver
from ..config import QUANT_BITS, DecoConfig
from ..errors import NonFiniteGradientError
from ..optim import DecoOptimizer
from ..state import DecoState
from .baselines import run_dga, run_powersgd
from .context import RankContext, eval_due, evaluate, make_sgd, run_record
from .plan import RunSpec
from .vclock import LinkTimeline, StepClock
from .vdriver import VirtualAccountant

__all__ = ["run_method", "apriori_fields", "grid_prediction"]


def run_method(ctx: RankContext, spec: RunSpec) -> dict[str, Any]:
    """Train one run on this rank; the returned record is meaningful on rank 0."""
    if spec.kind == "dga":
        return run_dga(ctx, spec)
    if spec.kind == "powersgd":
        return run_powersgd(ctx, spec)
    return _run_deco(ctx, spec)


def _run_deco(ctx: RankContext, spec: RunSpec) -> dict[str, Any]:
    cfg, t = ctx.cfg, ctx.cfg.train
    fields = dict(spec.deco)
    # static_apriori: DeCo-SGD's first (δ, τ, value format) of this seed, frozen.
    apriori = ctx.apriori.get(spec.seed, (1.0, 0, "fp32")) if spec.kind == "static_apriori" else None
    if apriori is not None:
        fields.update(apriori_fields(cfg.deco_config(seed=spec.seed), *apriori))
    if fields.get("mode") == "static":
        # tau_max bounds the controller's search only; a static point may lie beyond it.
        fields["tau_max"] = max(int(cfg.deco.get("tau_max", 16)), int(fields.get("staleness", 0)))
    dcfg = cfg.deco_config(seed=spec.seed, **fields)
    model = ctx.task.model(spec.seed)
    opt = make_sgd(ctx, model)
    state = DecoState(dcfg, model)
    tl = LinkTimeline(cfg.network.link(), ctx.world)
    clock = StepClock(t.compute_time_s)
    acct = VirtualAccountant(state, tl, clock)
    link = tl.apriori_link()
    if dcfg.mode == "static" and link is not None:
        # Static runs measure nothing: they are told the scenario's a-priori link (like DGA's
        # delay), so `algo="auto"` runs the all-gather the time line charges. DeCo-SGD sets
        # its own from its measurements (AdaptiveDriver).
        set_measured(state.group, link[0], link[1])
    driver: AdaptiveDriver | None = None
    if dcfg.mode == "adaptive":
        driver = AdaptiveDriver(state, clock=acct)
        state.driver = driver
    else:
        state.driver = acct
    dopt = DecoOptimizer(opt, state)
    batches = ctx.task.batches(ctx.rank, ctx.world, spec.seed)
    curve = [{"t_s": 0.0, "step": 0, "metric": evaluate(ctx, model)}]
    w0 = time.perf_counter()
    diverged: int | None = None
    for step in range(1, t.steps + 1):
        batch = next(batches)
        dopt.zero_grad()
        loss = ctx.task.loss(model, batch)
        loss.backward()
        dopt.report_loss(loss)
        try:
            dopt.step()
        except NonFiniteGradientError:
            # The validity flags travel with the data, so every rank stops at this step. The
            # run is recorded as diverged (it never reaches a target it has not reached yet)
            # instead of aborting the whole benchmark.
            diverged = step
            curve.append({"t_s": clock.start, "step": step, "metric": evaluate(ctx, model)})
            ctx.progress(t.steps - step + 1)
            break
        if eval_due(ctx, step):
            curve.append({"t_s": clock.start, "step": step, "metric": evaluate(ctx, model)})
        ctx.progress(1)
    wall = time.perf_counter() - w0
    decisions: list[dict[str, Any]] = []
    r_est = None
    prediction: dict[str, Any] | None = None
    if driver is not None:
        for d, at in zip(driver.log, driver.log_t):
            decisions.append({"t_s": at, "step": d.step, "ratio": d.ratio, "staleness": d.staleness,
                              "values": d.values,
                              "bandwidth_mbps_est": None if d.bandwidth is None else d.bandwidth * 8 / 1e6,
                              "latency_ms_est": None if d.latency is None else d.latency * 1e3,
                              "bandwidth_mbps_true": tl.true_bandwidth(at) * 8 / 1e6, "t_comp_est_s": d.t_comp,
                              "r": d.r, "drift": d.drift, "drift_lo": d.drift_lo, "drift_hi": d.drift_hi,
                              "signal": d.signal, "gap": d.gap, "reason": d.reason, "changed": d.changed})
        r_est = driver.grad.r
        prediction = grid_prediction(driver, [(1.0, 0)] + list(cfg.methods.grid))
    params = {"ratio": dcfg.ratio, "staleness": dcfg.staleness, "codec": dcfg.codec, "mode": dcfg.mode}
    if apriori is not None:
        # The point it froze, as DeCo-SGD chose it (a quantized format runs as a chain of ratio 1).
        params.update(ratio=apriori[0], values=apriori[2])
    if diverged is None:
        dopt.close()
    else:
        _abandon(dopt)
    return run_record(spec, curve, clock, tl, wall, params, acct.steps_log, decisions=decisions, r_est=r_est,
                      diverged_at_step=diverged, prediction=prediction)


def apriori_fields(adaptive: DecoConfig, ratio: float, staleness: int, values: str) -> dict[str, Any]:
    """Static DecoConfig fields that freeze DeCo-SGD's point (δ, τ, value format).

    A quantized format becomes the static chain DeCo-SGD's own codec builds at that point
    (`DecoConfig.make_codec(ratio, values)`: top-k, then b-bit values; a chain carries its
    ratio, so `ratio` is 1); fp16/bf16 become the wire dtype.
    """
    fields: dict[str, Any] = {"ratio": ratio, "staleness": staleness}
    if values in QUANT_BITS and ratio < 1.0:
        fields.update(codec=adaptive.make_codec(ratio, values).spec, ratio=1.0)
    elif values != "fp32":
        fields["value_dtype"] = values
    return fields


def grid_prediction(driver: AdaptiveDriver, points: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """The controller's predicted W of static points (fp32 values), from the measurements of
    its first informed decision and of its last one: the benchmark's rank correlation."""
    out: dict[str, Any] = {"points": [[float(d), int(t)] for d, t in points]}
    ctl = driver.controller
    saved = (ctl.bad, ctl.tau_ok)
    for key, m in (("first", driver.first_informed), ("last", driver.last_measurements)):
        if m is None:
            out[key] = None
            continue
        ws = ctl.predict(m, points)
        out[key] = [w if w == w and w != float("inf") else None for w in ws]
    ctl.bad, ctl.tau_ok = saved
    return out


def _abandon(dopt: DecoOptimizer) -> None:
    """Close a diverged run: let its in-flight exchanges finish without applying them (every
    rank launched them, so the next run's collectives stay in the same order everywhere)."""
    st = dopt.state
    for e in st.fifo.pop_all():
        for u in e.units:
            u.wait(step=e.seq, tau=st.current_staleness)
    if st.driver is not None:
        st.driver.finish()
    st.close(barrier=True)
    dopt.closed = True
