"""The benchmark's method table and the per-rank training loop of each method
(docs/design/deco_sgd.md#baselines, docs/design/deco_sgd.md#virtual-time).

Every method trains the same task from the same initial weights on the same data shards
with the same optimiser (SGD + momentum, fixed learning rate) on the real code paths:

- `deco` (adaptive), `dsgd` (δ = 1, τ = 0), the static top-k grid, `static_apriori` and
  `cocktail` run through `DecoState` + `DecoOptimizer` (wrapper mode) on gloo;
- `dga` is the delayed-averaging wrapper (docs/design/deco_sgd.md#dga; dense all-reduce on gloo);
- `powersgd_r*` wrap the model in DDP with PyTorch's own `powerSGD_hook`.

Virtual time (docs/design/deco_sgd.md#virtual-time): a `VirtualAccountant` stands in as the state's driver. At the end of
every step it (1) charges each exchange unit the step launched on the `LinkTimeline` at the
end of the step's compute, with the unit's real payload bytes and its collective's pattern,
(2) advances the `StepClock` to max(start + T_comp, done of the entries the step applied).
For `deco`, the real `AdaptiveDriver` (same estimators, same controller, same control
all-reduces) runs with the accountant as its clock: transfer launch/done times, step
durations and the latency probes (priced as tiny collectives on the same link, without
queueing behind data) are virtual. It never reads the link configuration.

Every rank computes the same virtual times (payload sizes are equal on every rank), so
decisions stay replicated.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ccomm.comm.auto import set_measured

from ..adaptive import AdaptiveDriver
from ..errors import NonFiniteGradientError
from ..optim import DecoOptimizer
from ..state import DecoState
from ..timemodel import message_size, tau_min
from .config import BenchConfig
from .vclock import LinkTimeline, StepClock

__all__ = [
    "RunSpec",
    "build_plan",
    "VirtualAccountant",
    "RankContext",
    "run_method",
    "dga_delay",
    "grid_name",
    "first_decision",
]


def grid_name(ratio: float, tau: int) -> str:
    return f"static_d{ratio:g}_t{tau}"


@dataclass(frozen=True)
class RunSpec:
    """One (method, seed) training run; picklable so the parent can hand it to every rank."""

    name: str
    kind: str  # dsgd | deco | static | static_apriori | cocktail | dga | powersgd
    seed: int
    deco: dict[str, Any] = field(default_factory=dict)  # mode/codec/ratio/staleness for DeCo runs
    rank: int = 0  # PowerSGD rank

    @property
    def key(self) -> str:
        return f"{self.name}__s{self.seed}"


def build_plan(cfg: BenchConfig) -> list[RunSpec]:
    """Every run of a bench invocation, in the order the ranks execute them.

    D-SGD first (it sets the target), DeCo-SGD before static-a-priori (which freezes DeCo's
    first decision), the grid last (its seeds may be fewer).
    """
    m = cfg.methods
    skip = set(m.skip)
    plan: list[RunSpec] = []
    for s in cfg.train.seeds:
        plan.append(RunSpec("dsgd", "dsgd", s, {"mode": "static", "codec": "topk", "ratio": 1.0, "staleness": 0}))
        if "deco" not in skip:
            # No ratio: adaptive runs start at DecoConfig's conservative compressed point.
            plan.append(RunSpec("deco", "deco", s, {"mode": "adaptive", "codec": "topk", "staleness": 0}))
        if "static_apriori" not in skip:
            plan.append(RunSpec("static_apriori", "static_apriori", s, {"mode": "static", "codec": "topk"}))
        if "cocktail" not in skip:
            plan.append(RunSpec("cocktail", "cocktail", s, {"mode": "static", "codec": m.cocktail_codec,
                                                            "ratio": 1.0, "staleness": m.cocktail_staleness}))
        if "dga" not in skip:
            plan.append(RunSpec("dga", "dga", s))
        if "powersgd" not in skip:
            for r in m.powersgd_ranks:
                plan.append(RunSpec(f"powersgd_r{r}", "powersgd", s, rank=r))
    if "grid" not in skip:
        for s in cfg.train.static_seeds:
            for ratio, tau in m.grid:
                plan.append(RunSpec(grid_name(ratio, tau), "static", s,
                                    {"mode": "static", "codec": "topk", "ratio": ratio, "staleness": tau}))
    return plan


def dga_delay(cfg: BenchConfig, numels: Sequence[int]) -> int:
    """DGA's D = min(τ_min(1), methods.dga_tau_max) from the a-priori network (mean rate of the trace) [ours]."""
    link = cfg.network.link()
    n = cfg.workers
    size = message_size("allreduce_dense", n, numels, 1.0)
    bw = link.rate_trace.mean_mbps() * 1e6 / 8.0 if len(link.rate_trace.times_s) > 1 else link.rate_bps(0.0) / 8.0
    lat = size.latency_hops * link.latency_s
    tmax = cfg.methods.dga_tau_max
    return min(tau_min(cfg.train.compute_time_s, size.nbytes / bw, lat), tmax)


# ------------------------------------------------------------------------- virtual time
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
        #: Per step: exchange chains and applied steps, for `vclock.replay` (see `_result`).
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


# ------------------------------------------------------------------------- runs
@dataclass
class RankContext:
    """What one rank needs to run methods: its place, the task and the scenario."""

    rank: int
    world: int
    cfg: BenchConfig
    task: Any
    progress: Callable[[int], None] = lambda k: None
    #: seed -> (ratio, staleness) of DeCo's first decision, for static_apriori.
    apriori: dict[int, tuple[float, int]] = field(default_factory=dict)


def _sgd(ctx: RankContext, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = ctx.cfg.train
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)


def _evaluate(ctx: RankContext, model: torch.nn.Module) -> float | None:
    return ctx.task.evaluate(model) if ctx.rank == 0 else None


def _eval_due(ctx: RankContext, step: int) -> bool:
    t = ctx.cfg.train
    return step % t.eval_every == 0 or step == t.steps


def _result(spec: RunSpec, curve: list[dict[str, Any]], clock: StepClock, tl: LinkTimeline, wall: float,
            params: dict[str, Any], steps_log: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The run record rank 0 writes; `steps_log` lets the runner re-time it (`vclock.replay`)."""
    return {"name": spec.name, "kind": spec.kind, "seed": spec.seed, "params": params, "curve": curve,
            "final_metric": curve[-1]["metric"], "steps": clock.steps, "virtual_time_s": clock.start,
            "blocked_s": clock.blocked, "bytes_received_per_worker": tl.bytes_received,
            "wall_s": wall, "steps_log": steps_log, **extra}


def run_method(ctx: RankContext, spec: RunSpec) -> dict[str, Any]:
    """Train one run on this rank; the returned record is meaningful on rank 0."""
    if spec.kind == "dga":
        return _run_dga(ctx, spec)
    if spec.kind == "powersgd":
        return _run_powersgd(ctx, spec)
    return _run_deco(ctx, spec)


def _run_deco(ctx: RankContext, spec: RunSpec) -> dict[str, Any]:
    cfg, t = ctx.cfg, ctx.cfg.train
    fields = dict(spec.deco)
    if spec.kind == "static_apriori":
        ratio, tau = ctx.apriori.get(spec.seed, (1.0, 0))
        fields.update(ratio=ratio, staleness=tau)
    if fields.get("mode") == "static":
        # tau_max bounds the controller's search only; a static point may lie beyond it.
        fields["tau_max"] = max(int(cfg.deco.get("tau_max", 16)), int(fields.get("staleness", 0)))
    dcfg = cfg.deco_config(seed=spec.seed, **fields)
    model = ctx.task.model(spec.seed)
    opt = _sgd(ctx, model)
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
    curve = [{"t_s": 0.0, "step": 0, "metric": _evaluate(ctx, model)}]
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
            curve.append({"t_s": clock.start, "step": step, "metric": _evaluate(ctx, model)})
            ctx.progress(t.steps - step + 1)
            break
        if _eval_due(ctx, step):
            curve.append({"t_s": clock.start, "step": step, "metric": _evaluate(ctx, model)})
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
                              "r": d.r, "drift": d.drift, "gap": d.gap, "reason": d.reason, "changed": d.changed})
        r_est = driver.grad.r
        prediction = grid_prediction(driver, [(1.0, 0)] + list(cfg.methods.grid))
    params = {"ratio": dcfg.ratio, "staleness": dcfg.staleness, "codec": dcfg.codec, "mode": dcfg.mode}
    if diverged is None:
        dopt.close()
    else:
        _abandon(dopt)
    return _result(spec, curve, clock, tl, wall, params, acct.steps_log, decisions=decisions, r_est=r_est,
                   diverged_at_step=diverged, prediction=prediction)


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


def first_decision(decisions: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """DeCo's choice at the end of warm-up: the point in force after its first evaluated decision."""
    for d in decisions:
        if d["reason"].split(":")[1] in ("switch", "optimal", "hysteresis", "fallback"):
            return float(d["ratio"]), int(d["staleness"])
    return 1.0, 0


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()])


def _run_dga(ctx: RankContext, spec: RunSpec) -> dict[str, Any]:
    """Delayed gradient averaging (docs/design/deco_sgd.md#dga): local step now, correct with the mean D steps later.

    1. backward; keep g_i(s); take the local optimizer step on g_i(s);
    2. launch an async dense all-reduce of g_i(s)/n (charged as one all-reduce on the link);
    3. once more than D exchanges are in flight, wait for the oldest (step s−D) and correct
       θ_i += γ·(g_i(s−D) − ḡ(s−D)) directly on the parameters;
    4. replicas differ, so evaluation all-reduces the parameter mean (outside virtual time).
    """
    cfg, t = ctx.cfg, ctx.cfg.train
    model = ctx.task.model(spec.seed)
    opt = _sgd(ctx, model)
    params = [p for p in model.parameters()]
    D = dga_delay(cfg, [p.numel() for p in params])
    group = dist.new_group(backend="gloo")
    tl = LinkTimeline(cfg.network.link(), ctx.world)
    clock = StepClock(t.compute_time_s)
    batches = ctx.task.batches(ctx.rank, ctx.world, spec.seed)
    fifo: list[tuple[torch.Tensor, torch.Tensor, Any, float, int]] = []
    steps_log: list[dict[str, Any]] = []

    def averaged_eval() -> float | None:
        flat = torch.cat([p.detach().reshape(-1) for p in params]) / ctx.world
        dist.all_reduce(flat, group=group)
        if ctx.rank != 0:
            return None
        avg = ctx.task.model(spec.seed)
        torch.nn.utils.vector_to_parameters(flat, avg.parameters())
        return ctx.task.evaluate(avg)

    curve = [{"t_s": 0.0, "step": 0, "metric": averaged_eval()}]
    w0 = time.perf_counter()
    for step in range(1, t.steps + 1):
        opt.zero_grad()
        ctx.task.loss(model, next(batches)).backward()
        g = _flat_grads(model).clone()
        opt.step()
        buf = g / ctx.world
        work = dist.all_reduce(buf, group=group, async_op=True)
        nbytes = buf.numel() * buf.element_size()
        done = tl.exchange(clock.launch_s, nbytes, "allreduce")
        fifo.append((g, buf, work, done, step - 1))
        applied, seqs = [], []
        while len(fifo) > D:
            g_old, mean, w, d, seq = fifo.pop(0)
            w.wait()
            with torch.no_grad():
                corr = (g_old - mean) * t.lr
                torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) + corr, params)
            applied.append(d)
            seqs.append(seq)
        steps_log.append({"x": [[[nbytes, "allreduce"]]], "a": seqs})
        clock.end_step(applied)
        if _eval_due(ctx, step):
            curve.append({"t_s": clock.start, "step": step, "metric": averaged_eval()})
        ctx.progress(1)
    wall = time.perf_counter() - w0
    for item in fifo:
        item[2].wait()
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    return _result(spec, curve, clock, tl, wall, {"ratio": 1.0, "staleness": D, "delay_D": D}, steps_log)


def _powersgd_sizes(grads: Sequence[torch.Tensor], rank: int, min_rate: float) -> tuple[int, int, int]:
    """Elements of the three all-reduces torch's powerSGD_hook runs on one bucket.

    Same split as the hook (its own `_should_compress`): uncompressed tensors, then P, then Q.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    unc = ps = qs = 0
    for g in grads:
        n = g.shape[0]
        m = g.numel() // max(n, 1)
        r = min(n, m, rank)
        if _should_compress(n, m, r, min_rate)[0]:
            ps += n * r
            qs += m * r
        else:
            unc += g.numel()
    return unc, ps, qs


def _run_powersgd(ctx: RankContext, spec: RunSpec) -> dict[str, Any]:
    """DDP + PyTorch's powerSGD_hook (docs/design/deco_sgd.md#powersgd); a thin wrapper records what each bucket sends.

    Before `start_powerSGD_iter` the hook runs one dense all-reduce per bucket; after it,
    three dependent all-reduces (uncompressed tensors, P, Q), charged one after the other.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg, t = ctx.cfg, ctx.cfg.train
    model = ctx.task.model(spec.seed)
    group = dist.new_group(backend="gloo")
    # One bucket: with several, the hook's chained collectives (P after the uncompressed part,
    # Q after P) of different buckets can run in different orders on different gloo ranks,
    # which aborted runs with a collective size mismatch.
    ddp = DDP(model, process_group=group, bucket_cap_mb=max(64.0, 2 * sum(p.numel() for p in model.parameters())
                                                            * 4 / 2**20))
    opt = _sgd(ctx, model)
    warm = cfg.deco_config().warmup_steps
    pstate = psgd.PowerSGDState(process_group=group, matrix_approximation_rank=spec.rank,
                                start_powerSGD_iter=max(2, warm), use_error_feedback=True, warm_start=True,
                                random_seed=spec.seed)
    sent: list[list[int]] = []  # per bucket of this step: element counts of its dependent all-reduces

    def hook(st: Any, bucket: Any) -> Any:
        if st.iter < st.start_powerSGD_iter:
            sent.append([bucket.buffer().numel()])
        else:
            sent.append([x for x in _powersgd_sizes(bucket.gradients(), st.matrix_approximation_rank,
                                                     st.min_compression_rate) if x > 0])
        return psgd.powerSGD_hook(st, bucket)

    # DDP checks the hook's annotations as objects; this module's are strings (PEP 563).
    hook.__annotations__ = {"st": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    ddp.register_comm_hook(pstate, hook)
    tl = LinkTimeline(cfg.network.link(), ctx.world)
    clock = StepClock(t.compute_time_s)
    batches = ctx.task.batches(ctx.rank, ctx.world, spec.seed)
    curve = [{"t_s": 0.0, "step": 0, "metric": _evaluate(ctx, model)}]
    steps_log: list[dict[str, Any]] = []
    w0 = time.perf_counter()
    for step in range(1, t.steps + 1):
        opt.zero_grad()
        sent.clear()
        ctx.task.loss(ddp, next(batches)).backward()
        opt.step()
        launch = clock.launch_s
        dones = []
        for chain in sent:
            d = launch
            for elems in chain:
                d = tl.exchange(d, elems * 4, "allreduce")
            dones.append(d)
        steps_log.append({"x": [[[elems * 4, "allreduce"] for elems in chain] for chain in sent], "a": [step - 1]})
        clock.end_step(dones)
        if _eval_due(ctx, step):
            curve.append({"t_s": clock.start, "step": step, "metric": _evaluate(ctx, model)})
        ctx.progress(1)
    wall = time.perf_counter() - w0
    dist.barrier(group=group)
    del ddp
    dist.destroy_process_group(group)
    return _result(spec, curve, clock, tl, wall, {"ratio": None, "staleness": 0, "powersgd_rank": spec.rank},
                   steps_log)
