"""Runtime behaviour beyond the special cases (docs/design/deco_sgd.md#special-cases): additive random-k, lr
scaling, shutdown flush (docs/design/deco_sgd.md#shutdown)."""
from __future__ import annotations

import math
from typing import Any, Iterator

import pytest
import torch

from ccomm.ranks import RankPool

try:
    from . import _train as T
except ImportError:
    import _train as T

pytestmark = pytest.mark.multiprocess

STEPS = 8
ATOL = 1e-6


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2, group_timeout_s=30.0) as p:
        yield p


def _cfg(**kw: Any) -> Any:
    from deco_sgd import DecoConfig

    return DecoConfig(**{"mode": "static", "codec": "topk", "warmup_steps": 0, "timeout_s": 30.0, **kw})


def _aggregate_is_mean_of_messages(rank: int, world: int, codec: str, ratio: float) -> list[float]:
    """Per applied step: max |aggregate - mean of every rank's own decoded message|."""
    import torch.distributed as dist

    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    st = DecoState(_cfg(codec=codec, ratio=ratio, staleness=1), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), st)
    errs = []
    for s in range(STEPS):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        opt.step()
        for e in opt.last_applied:
            for n in st.names:
                own = next(u.own[n] for u in e.units if n in u.names)
                msgs = [torch.empty_like(own) for _ in range(world)]
                dist.all_gather(msgs, own.contiguous())
                mean = sum(msgs[1:], msgs[0].clone()) / world
                errs.append(float((DecoState.aggregate(e, n) - mean).abs().max()))
                assert int((own != 0).sum()) <= math.ceil(ratio * own.numel())  # really compressed
    assert T.replicas_equal(model)
    st.close()
    return errs


@pytest.mark.parametrize("codec", ["topk", "randomk"])
def test_aggregate_is_mean_of_sent_messages(pool: RankPool, codec: str) -> None:
    for errs in pool.run(_aggregate_is_mean_of_messages, codec, 0.25):
        assert len(errs) == (STEPS - 1) * 4  # τ = 1: STEPS - 1 applied steps, 4 parameters
        assert max(errs) <= ATOL


def _wrapper(rank: int, world: int, cfg: Any, momentum: float) -> dict:
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR, momentum=momentum), DecoState(cfg, model))
    for s in range(STEPS):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        opt.step()
    opt.state.close()
    return T.params(model)


def _reference(rank: int, world: int, tau: int, lr: float) -> dict:
    return T.reference_run(STEPS, lambda s: tau, lambda s: 1.0, rank, world, lr=lr)


def test_lr_tau_scaling_divides_lr_by_tau_plus_one(pool: RankPool) -> None:
    out = pool.run(_wrapper, _cfg(ratio=1.0, staleness=2, lr_tau_scaling=True), T.MOMENTUM)
    ref = pool.run(_reference, 2, T.LR / 3)
    unscaled = pool.run(_reference, 2, T.LR)
    for r in range(2):
        for n in ref[r]:
            torch.testing.assert_close(out[r][n], ref[r][n], atol=ATOL, rtol=0)
        assert any(not torch.allclose(out[r][n], unscaled[r][n]) for n in ref[r])


def _conservation(rank: int, world: int, flush: str, flush_residual: bool) -> tuple[float, float]:
    """Plain SGD: θ0 − θ_end versus lr · (mean over ranks of Σ_s g_s − mean residual left)."""
    import torch.distributed as dist

    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    theta0 = T.params(model)
    st = DecoState(_cfg(ratio=0.25, staleness=2, flush=flush, flush_residual=flush_residual), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), st)
    gsum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for s in range(STEPS):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        for n, p in model.named_parameters():
            gsum[n] += p.grad
        opt.step()
    inflight = len(st.fifo)
    opt.close()
    assert len(st.fifo) == 0 and inflight == 2
    st.fifo.check()
    worst, moved = 0.0, 0.0
    for n, p in model.named_parameters():
        left = st.ef.residual(n)
        expect = gsum[n] - (0 if left is None else left)
        dist.all_reduce(expect)
        delta = (theta0[n] - p.detach()) / T.LR
        worst = max(worst, float((delta - expect / world).abs().max()))
        moved = max(moved, float(delta.abs().max()))
    st.close()
    return worst, moved


@pytest.mark.parametrize("flush,flush_residual", [("apply", False), ("apply", True), ("discard", False)])
def test_flush_conserves_gradient_mass(pool: RankPool, flush: str, flush_residual: bool) -> None:
    # Every gradient ends up applied, in a residual, or (discard) back in its sender's residual.
    for worst, moved in pool.run(_conservation, flush, flush_residual):
        assert moved > 0.01
        assert worst <= 1e-5


def _half_wire(rank: int, world: int, value_dtype: str, ratio: float) -> tuple[list[float], list[int], bool]:
    """Half-precision wire: aggregate = mean of messages; bytes per unit shrink accordingly."""
    import torch.distributed as dist

    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    st = DecoState(_cfg(ratio=ratio, staleness=0, value_dtype=value_dtype), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), st)
    errs, nbytes = [], []
    for s in range(STEPS):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        opt.step()
        for e in opt.last_applied:
            nbytes.append(sum(u.nbytes for u in e.units))
            for n in st.names:
                own = next(u.own[n] for u in e.units if n in u.names)
                assert own.dtype == torch.float32
                msgs = [torch.empty_like(own) for _ in range(world)]
                dist.all_gather(msgs, own.contiguous())
                mean = sum(msgs[1:], msgs[0].clone()) / world
                errs.append(float((DecoState.aggregate(e, n) - mean).abs().max()))
    finite = all(torch.isfinite(st.ef.residual(n)).all() for n in st.names if st.ef.residual(n) is not None)
    st.close()
    return errs, nbytes, finite and T.replicas_equal(model)


#: fp16 carries ~3 decimal digits; gradients here are O(1).
HALF_ATOL = 2e-3


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_half_precision_wire(pool: RankPool, ratio: float) -> None:
    full = pool.run(_half_wire, "fp32", ratio)
    half = pool.run(_half_wire, "fp16", ratio)
    for r in range(2):
        errs, nbytes, ok = half[r]
        assert ok and max(errs) <= HALF_ATOL
        assert all(h < f for h, f in zip(nbytes, full[r][1]))


def _hook_ready_after_backward(rank: int, world: int) -> tuple[list[bool], tuple[int, int, int]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deco_sgd.hook import deco_hook
    from deco_sgd.state import DecoState

    ddp = DDP(T.make_model(), bucket_cap_mb=0.0005)
    state = DecoState(_cfg(ratio=0.25, staleness=2, warmup_steps=1), ddp.module)
    ddp.register_comm_hook(state, deco_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=T.LR)
    ready = []
    for s in range(STEPS):
        opt.zero_grad()
        T.loss_fn(ddp, rank, s).backward()
        ready.append(state.ready)  # read right after backward, without DecoOptimizer
        if ready[-1]:
            opt.step()
        state.fifo.check()
    f = state.fifo
    return ready, (f.launched, f.applied, len(f))


def test_hook_ready_is_known_after_backward(pool: RankPool) -> None:
    for ready, counters in pool.run(_hook_ready_after_backward):
        assert ready == [True, False, False] + [True] * (STEPS - 3)
        assert counters == (STEPS, STEPS - 2, 2)


def _applied_units_freed(rank: int, world: int, hook: bool) -> tuple[int, int, int]:
    """With the cyclic GC off, count the applied steps' units that are still alive.

    Returns (units tracked, applied units still alive, units in flight).
    """
    import gc
    import time
    import weakref

    from deco_sgd.hook import attach_ddp
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    cfg = _cfg(ratio=0.25, staleness=2, warmup_steps=1)
    if hook:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model: torch.nn.Module = DDP(T.make_model(), bucket_cap_mb=0.0005)
        opt = attach_ddp(model, torch.optim.SGD(model.parameters(), lr=T.LR), cfg)
    else:
        model = T.make_model()
        opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), DecoState(cfg, model))
    state = opt.state
    refs: dict[int, list[weakref.ref]] = {}
    gc.collect()
    gc.disable()  # only reference counting may free what an applied step leaves behind
    try:
        for s in range(STEPS):
            opt.zero_grad()
            T.loss_fn(model, rank, s).backward()
            opt.step()
            for e in state.fifo:
                refs.setdefault(e.seq, [weakref.ref(u) for u in e.units])
        # In flight, or kept on purpose as the optimizer's `last_applied`.
        held = {e.seq for e in state.fifo} | {e.seq for e in getattr(opt, "last_applied", [])}
        in_flight = {e.seq for e in state.fifo}

        def alive_now() -> int:
            return sum(r() is not None for seq, rs in refs.items() if seq not in held for r in rs)

        # gloo's thread may still be inside a completed future's callback, which holds its
        # unit until it returns: wait a moment for that. A cycle would never let go.
        deadline = time.monotonic() + 2.0
        while alive_now() and time.monotonic() < deadline:
            time.sleep(0.01)
        alive = alive_now()
        tracked = sum(len(rs) for rs in refs.values())
        return tracked, alive, len(in_flight)
    finally:
        gc.enable()
        state.close()


@pytest.mark.parametrize("hook", [False, True], ids=["wrapper", "hook"])
def test_applied_steps_are_freed_without_the_cyclic_gc(pool: RankPool, hook: bool) -> None:
    # A unit whose decode closure or future refers back to it would wait for a full cyclic
    # collection with its payloads and aggregate: ~10 MB per step on a 1.9 M MLP (OOM seen).
    for tracked, alive, in_flight in pool.run(_applied_units_freed, hook):
        assert in_flight == 2 and tracked >= STEPS - 1
        assert alive == 0
