"""The in-flight FIFO: invariant, deepen and drain, without and with ranks
(docs/design/deco_sgd.md#staleness-model, docs/design/deco_sgd.md#changing-ratio-and-staleness)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deco_sgd.staleness import InFlightFifo

from ccomm.ranks import RankPool

try:
    from . import _train as T
except ImportError:
    import _train as T


@dataclass
class _E:
    seq: int


def _drive(taus: list[int], skip_every: int = 0) -> tuple[InFlightFifo[_E], list[int], list[int]]:
    """Run the forward-time loop (docs/design/deco_sgd.md#update-rule) with τ = taus[s]; returns the fifo,
    apply order and fill steps."""
    fifo: InFlightFifo[_E] = InFlightFifo()
    order, fills = [], []
    for s, tau in enumerate(taus):
        due = fifo.due_count(tau, pending=1)
        fifo.push(_E(s))
        popped = fifo.pop_due(tau)
        assert len(popped) == due
        if not popped:
            fills.append(s)
        for e in popped:
            skip = bool(skip_every) and e.seq % skip_every == 0
            fifo.settle(e, applied=not skip)
            order.append(e.seq)
        fifo.check()
    return fifo, order, fills


@given(st.lists(st.integers(0, 6), min_size=1, max_size=60), st.integers(0, 4))
def test_invariant_and_each_entry_once_in_order(taus: list[int], skip_every: int) -> None:
    fifo, order, _ = _drive(taus, skip_every)
    assert order == sorted(order) and len(set(order)) == len(order)
    assert fifo.launched == len(taus) == fifo.applied + fifo.skipped + len(fifo)
    assert len(fifo) <= taus[-1] and len(fifo) == len(taus) - len(order)
    assert fifo.seqs == list(range(len(taus) - len(fifo), len(taus)))


def test_deepen_fills_then_drain_pops_oldest_together() -> None:
    taus = [0, 0, 3, 3, 3, 3, 3, 1, 1, 1]
    fifo: InFlightFifo[_E] = InFlightFifo()
    popped_per_step = []
    for s, tau in enumerate(taus):
        fifo.push(_E(s))
        popped = fifo.pop_due(tau)
        for e in popped:
            fifo.settle(e, applied=True)
        popped_per_step.append([e.seq for e in popped])
    # τ 0 -> 3 at step 2: three fill steps (2, 3, 4); step 5 applies step 2's exchange.
    assert popped_per_step[:6] == [[0], [1], [], [], [], [2]]
    # τ 3 -> 1 at step 7: τ - τ' + 1 = 3 entries at once, oldest first, then one per step.
    assert popped_per_step[6:] == [[3], [4, 5, 6], [7], [8]]


def test_settle_twice_or_unpopped_is_refused() -> None:
    fifo: InFlightFifo[_E] = InFlightFifo()
    e = _E(0)
    fifo.push(e)
    with pytest.raises(ValueError, match="not popped"):
        fifo.settle(e, applied=True)
    fifo.pop_all()
    fifo.settle(e, applied=True)
    with pytest.raises(ValueError, match="already settled"):
        fifo.settle(e, applied=True)
    with pytest.raises(ValueError, match="seq"):
        fifo.push(_E(0)) or fifo.push(_E(0))


# -- τ changes mid-run on 2 ranks -----------------------------------------------------

STEPS = 12
#: (step, ratio, tau): decisions scheduled to take effect at that step.
SCHEDULE = [(3, 1.0, 3), (8, 0.25, 1)]


def _tau_at(s: int) -> int:
    return 0 if s < 3 else 3 if s < 8 else 1


def _ratio_at(s: int) -> float:
    return 1.0 if s < 8 else 0.25


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2, group_timeout_s=30.0) as p:
        yield p


def _cfg(**kw: object) -> object:
    from deco_sgd import DecoConfig

    # static: only the test's own schedule() changes (δ, τ), no controller.
    return DecoConfig(**{"mode": "static", "codec": "topk", "warmup_steps": 0, "timeout_s": 30.0, **kw})


def _wrapper_with_schedule(rank: int, world: int) -> tuple[dict, tuple[int, int, int, int], list[bool]]:
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    state = DecoState(_cfg(), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR, momentum=T.MOMENTUM), state)
    ready = []
    for s in range(STEPS):
        for at, ratio, tau in SCHEDULE:
            if at == s:
                state.schedule(ratio, tau, s, reason="test")
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        opt.step()
        ready.append(state.ready)
    f = state.fifo
    counters = (f.launched, f.applied, f.skipped, len(f))
    state.close()
    return T.params(model), counters, ready


def _hook_with_schedule(rank: int, world: int) -> tuple[dict, list[bool]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deco_sgd.hook import attach_ddp

    ddp = DDP(T.make_model(), bucket_cap_mb=0.0005)
    # Plain SGD: the hook sums drained aggregates into one step, exact only without momentum.
    opt = attach_ddp(ddp, torch.optim.SGD(ddp.parameters(), lr=T.LR), _cfg(warmup_steps=1))
    ready = []
    for s in range(STEPS):
        for at, ratio, tau in SCHEDULE:
            if at == s:
                opt.state.schedule(ratio, tau, s, reason="test")
        opt.zero_grad()
        T.loss_fn(ddp, rank, s).backward()
        opt.step()
        ready.append(opt.state.ready)
    return T.params(ddp), ready


def _reference(rank: int, world: int, momentum: float) -> dict:
    return T.reference_run(STEPS, _tau_at, _ratio_at, rank, world, momentum=momentum)


@pytest.mark.multiprocess
def test_wrapper_deepen_and_drain_match_reference(pool: RankPool) -> None:
    out = pool.run(_wrapper_with_schedule)
    ref = pool.run(_reference, T.MOMENTUM)
    for r in range(2):
        params, (launched, applied, skipped, inflight), ready = out[r]
        assert launched == STEPS and skipped == 0 and inflight == 1 and applied == STEPS - 1
        assert ready == [True] * 3 + [False] * 3 + [True] * 6
        for n in ref[r]:
            torch.testing.assert_close(params[n], ref[r][n], atol=1e-6, rtol=0)
    for n in out[0][0]:
        assert torch.equal(out[0][0][n], out[1][0][n])


@pytest.mark.multiprocess
def test_hook_deepen_and_drain_match_reference_plain_sgd(pool: RankPool) -> None:
    out = pool.run(_hook_with_schedule)
    ref = pool.run(_reference, 0.0)
    for r in range(2):
        params, ready = out[r]
        assert ready == [True] * 3 + [False] * 3 + [True] * 6
        for n in ref[r]:
            torch.testing.assert_close(params[n], ref[r][n], atol=1e-6, rtol=0)
    for n in out[0][0]:
        assert torch.equal(out[0][0][n], out[1][0][n])
