"""The special cases (docs/design/deco_sgd.md#special-cases) on 2 gloo ranks, in hook (DDP) and wrapper mode."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from ccomm.ranks import RankPool

try:
    from . import _train as T
except ImportError:
    import _train as T

pytestmark = pytest.mark.multiprocess

STEPS = 8
#: Float tolerance where summation order may differ from the reference (none expected on 2 ranks).
ATOL = 1e-6


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2, group_timeout_s=30.0) as p:
        yield p


def _cfg(**kw: object) -> "object":
    from deco_sgd import DecoConfig

    base = dict(mode="static", codec="topk", warmup_steps=0, timeout_s=30.0)
    base.update(kw)
    return DecoConfig(**base)


def _train_wrapper(rank: int, world: int, cfg: object, steps: int) -> tuple[dict, bool, tuple[int, int, int]]:
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    state = DecoState(cfg, model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR, momentum=T.MOMENTUM), state)
    for s in range(steps):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        opt.step()
    counters = (state.fifo.launched, state.fifo.applied, len(state.fifo))
    out = T.params(model), T.replicas_equal(model), counters
    state.close()
    return out


def _train_ddp(rank: int, world: int, cfg: object | None, steps: int) -> tuple[dict, bool, list[bool]]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deco_sgd.hook import attach_ddp

    # Two buckets (bucket_cap_mb tiny) so per-bucket futures and ordering are exercised.
    ddp = DDP(T.make_model(), bucket_cap_mb=0.0005)
    inner = torch.optim.SGD(ddp.parameters(), lr=T.LR, momentum=T.MOMENTUM)
    if cfg is None:
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        opt = inner
    else:
        opt = attach_ddp(ddp, inner, cfg)
    ready = []
    for s in range(steps):
        opt.zero_grad()
        T.loss_fn(ddp, rank, s).backward()
        opt.step()
        if cfg is not None:
            ready.append(opt.state.ready)
    return T.params(ddp), T.replicas_equal(ddp), ready


def _reference(rank: int, world: int, steps: int, tau: int, ratio: float, warmup: int) -> dict:
    return T.reference_run(steps, lambda s: 0 if s < warmup else tau, lambda s: 1.0 if s < warmup else ratio,
                           rank, world)


def _assert_same(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), (n, (a[n] - b[n]).abs().max())
        else:
            torch.testing.assert_close(a[n], b[n], atol=ATOL, rtol=0)


def test_dense_sync_matches_ddp_allreduce_hook(pool: RankPool) -> None:
    ddp = pool.run(_train_ddp, None, STEPS)
    hook = pool.run(_train_ddp, _cfg(ratio=1.0, staleness=0, warmup_steps=1), STEPS)
    wrap = pool.run(_train_wrapper, _cfg(ratio=1.0, staleness=0), STEPS)
    for r in range(2):
        _assert_same(ddp[r][0], hook[r][0], exact=True)
        _assert_same(ddp[r][0], wrap[r][0], exact=True)
        assert hook[r][1] and wrap[r][1]
        assert all(hook[r][2])  # τ = 0: every step applies


def test_ef_topk_sync_equals_ef_sgd_reference(pool: RankPool) -> None:
    wrap = pool.run(_train_wrapper, _cfg(ratio=0.25, staleness=0), STEPS)
    hook = pool.run(_train_ddp, _cfg(ratio=0.25, staleness=0, warmup_steps=1), STEPS)
    ref = pool.run(_reference, STEPS, 0, 0.25, 0)
    ref_h = pool.run(_reference, STEPS, 0, 0.25, 1)
    dense = pool.run(_reference, STEPS, 0, 1.0, 0)
    for r in range(2):
        _assert_same(wrap[r][0], ref[r], exact=False)
        _assert_same(hook[r][0], ref_h[r], exact=False)
        assert wrap[r][1] and hook[r][1]
    # Compression must actually change the trajectory, or the comparison proves nothing.
    assert any(not torch.allclose(wrap[0][0][n], dense[0][n]) for n in dense[0])


@pytest.mark.parametrize("tau", [1, 3])
def test_delayed_dense_applies_same_stale_mean(pool: RankPool, tau: int) -> None:
    wrap = pool.run(_train_wrapper, _cfg(ratio=1.0, staleness=tau), STEPS)
    ref = pool.run(_reference, STEPS, tau, 1.0, 0)
    hook = pool.run(_train_ddp, _cfg(ratio=1.0, staleness=tau, warmup_steps=1), STEPS)
    ref_h = pool.run(_reference, STEPS, tau, 1.0, 1)
    for r in range(2):
        _assert_same(wrap[r][0], ref[r], exact=False)
        _assert_same(hook[r][0], ref_h[r], exact=False)
        assert wrap[r][1] and hook[r][1]
        launched, applied, inflight = wrap[r][2]
        assert (launched, applied, inflight) == (STEPS, STEPS - tau, tau)
        # warm-up step applies, then τ fill steps (deepen from 0 to τ), then every step
        assert hook[r][2] == [True] + [False] * tau + [True] * (STEPS - 1 - tau)


def test_delayed_topk_replicas_identical(pool: RankPool) -> None:
    wrap = pool.run(_train_wrapper, _cfg(ratio=0.1, staleness=2), STEPS)
    ref = pool.run(_reference, STEPS, 2, 0.1, 0)
    for r in range(2):
        assert wrap[r][1]
        _assert_same(wrap[r][0], ref[r], exact=False)
