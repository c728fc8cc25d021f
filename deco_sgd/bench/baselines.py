"""The benchmark's two baselines that do not run through `DecoState`
(docs/design/deco_sgd.md#dga, docs/design/deco_sgd.md#powersgd).

- `dga`: delayed gradient averaging, a local step now and a correction with the mean D steps
  later, over async dense all-reduces on gloo (`run_dga`);
- `powersgd_r*`: the model wrapped in DDP with PyTorch's own `powerSGD_hook` (`run_powersgd`).

Both charge what they send on the scenario's `LinkTimeline` and log it per step in the
format `vclock.replay` re-times, like the DeCo-SGD runs (`methods`).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..timemodel import message_size, tau_min
from .config import BenchConfig
from .context import RankContext, eval_due, evaluate, make_sgd, run_record
from .plan import RunSpec
from .vclock import LinkTimeline, StepClock

__all__ = ["dga_delay", "run_dga", "run_powersgd"]


def dga_delay(cfg: BenchConfig, numels: Sequence[int]) -> int:
    """DGA's D = min(τ_min(1), methods.dga_tau_max) from the a-priori network (mean rate of the trace) [ours]."""
    link = cfg.network.link()
    n = cfg.workers
    size = message_size("allreduce_dense", n, numels, 1.0)
    bw = link.rate_trace.mean_mbps() * 1e6 / 8.0 if len(link.rate_trace.times_s) > 1 else link.rate_bps(0.0) / 8.0
    lat = size.latency_hops * link.latency_s
    tmax = cfg.methods.dga_tau_max
    return min(tau_min(cfg.train.compute_time_s, size.nbytes / bw, lat), tmax)


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()])


def run_dga(ctx: RankContext, spec: RunSpec) -> dict[str, Any]:
    """Delayed gradient averaging (docs/design/deco_sgd.md#dga): local step now, correct with the mean D steps later.

    1. backward; keep g_i(s); take the local optimizer step on g_i(s);
    2. launch an async dense all-reduce of g_i(s)/n (charged as one all-reduce on the link);
    3. once more than D exchanges are in flight, wait for the oldest (step s−D) and correct
       θ_i += γ·(g_i(s−D) − ḡ(s−D)) directly on the parameters;
    4. replicas differ, so evaluation all-reduces the parameter mean (outside virtual time).
    """
    cfg, t = ctx.cfg, ctx.cfg.train
    model = ctx.task.model(spec.seed)
    opt = make_sgd(ctx, model)
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
        if eval_due(ctx, step):
            curve.append({"t_s": clock.start, "step": step, "metric": averaged_eval()})
        ctx.progress(1)
    wall = time.perf_counter() - w0
    for item in fifo:
        item[2].wait()
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    return run_record(spec, curve, clock, tl, wall, {"ratio": 1.0, "staleness": D, "delay_D": D}, steps_log)


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


def run_powersgd(ctx: RankContext, spec: RunSpec) -> dict[str, Any]:
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
    opt = make_sgd(ctx, model)
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
    curve = [{"t_s": 0.0, "step": 0, "metric": evaluate(ctx, model)}]
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
        if eval_due(ctx, step):
            curve.append({"t_s": clock.start, "step": step, "metric": evaluate(ctx, model)})
        ctx.progress(1)
    wall = time.perf_counter() - w0
    dist.barrier(group=group)
    del ddp
    dist.destroy_process_group(group)
    return run_record(spec, curve, clock, tl, wall, {"ratio": None, "staleness": 0, "powersgd_rank": spec.rank},
                      steps_log)
