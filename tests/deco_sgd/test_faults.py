"""Faults: non-finite gradients never reach the residual; a dead peer raises, never hangs
(docs/design/deco_sgd.md#validation-and-faults)."""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest
import torch

from _timing import on_time
from ccomm.ranks import RankPool

try:
    from . import _train as T
except ImportError:
    import _train as T

pytestmark = pytest.mark.multiprocess

STEPS = 8
BAD_STEP = 3
BAD_RANK = 1
#: Group timeout of the dead-peer test, and the slack allowed on top of it (docs/design/deco_sgd.md#dead-peers).
DEAD_TIMEOUT_S = 3.0
DEAD_SLACK_S = 5.0
#: A dead-peer run is judged only if the host's scheduling lag stayed within a fifth of the slack.
DEAD_LAG_LIMIT_S = DEAD_SLACK_S / 5


def _dead_peer_run(fn: Any) -> tuple[str, str, float]:
    """Rank 0's (error type, message, seconds) of ``fn`` on 2 fresh ranks whose rank 1 dies,
    judged only on a run the host kept up with (tests/_timing.py)."""
    def once() -> tuple[str, str, float]:
        # The default group keeps a patient timeout: on a loaded host the ranks reach DDP's
        # construction seconds apart. DeCo's own groups carry DEAD_TIMEOUT_S (its config).
        with RankPool(2, group_timeout_s=60.0) as pool:
            return pool.run(fn, may_exit=[1], timeout=DEAD_TIMEOUT_S + 60)[0]

    return on_time(once, lag_limit_s=DEAD_LAG_LIMIT_S)


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2, group_timeout_s=30.0) as p:
        yield p


def _cfg(**kw: Any) -> Any:
    from deco_sgd import DecoConfig

    return DecoConfig(**{"mode": "static", "codec": "topk", "warmup_steps": 0, "timeout_s": 30.0, **kw})


def _poison(model: torch.nn.Module, rank: int, s: int) -> None:
    if rank == BAD_RANK and s == BAD_STEP:
        next(model.parameters()).grad[0, 0] = float("nan")


def _wrapper_skip(rank: int, world: int, ratio: float, tau: int) -> dict[str, Any]:
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    state = DecoState(_cfg(ratio=ratio, staleness=tau), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR, momentum=T.MOMENTUM), state)
    out: dict[str, Any] = {"ready": [], "res_finite": True}
    for s in range(STEPS):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        _poison(model, rank, s)
        if s == BAD_STEP:
            out["grad_bad_step"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            out["res_before"] = {n: state.ef.residual(n) for n in state.names}
        opt.step()
        out["ready"].append(state.ready)
        if s == BAD_STEP + tau:
            out["res_after"] = {n: state.ef.residual(n) for n in state.names}
        out["res_finite"] &= all(torch.isfinite(state.ef.residual(n)).all() for n in state.names
                                 if state.ef.residual(n) is not None)
    out["params"] = T.params(model)
    out["replicas_equal"] = T.replicas_equal(model)
    out["counters"] = (state.fifo.launched, state.fifo.applied, state.fifo.skipped, len(state.fifo))
    state.close()
    return out


@pytest.mark.parametrize("ratio,tau", [(1.0, 0), (0.25, 2)])
def test_skip_keeps_residual_clean_and_replicas_equal(pool: RankPool, ratio: float, tau: int) -> None:
    out = pool.run(_wrapper_skip, ratio, tau)
    for r, o in enumerate(out):
        assert o["res_finite"]
        assert o["replicas_equal"]
        assert all(torch.isfinite(p).all() for p in o["params"].values())
        assert o["counters"] == (STEPS, STEPS - tau - 1, 1, tau)
        expect_ready = [s >= tau and s != BAD_STEP + tau for s in range(STEPS)]
        assert o["ready"] == expect_ready
    if ratio == 1.0:
        # Dense τ = 0: the valid rank gets its whole step-3 gradient back as residual; the bad
        # rank never compensated, so it has none.
        good = out[1 - BAD_RANK]
        for n, g in good["grad_bad_step"].items():
            assert torch.equal(good["res_after"][n], g)
        assert all(v is None for v in out[BAD_RANK]["res_after"].values())


def _wrapper_raise(rank: int, world: int) -> str:
    from deco_sgd.errors import NonFiniteGradientError
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    state = DecoState(_cfg(ratio=0.25, staleness=1, nonfinite="raise"), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), state)
    try:
        for s in range(STEPS):
            opt.zero_grad()
            T.loss_fn(model, rank, s).backward()
            _poison(model, rank, s)
            opt.step()
    except NonFiniteGradientError as e:
        assert e.step == BAD_STEP and e.ranks == (BAD_RANK,)
        assert state.step == BAD_STEP + 2  # raised when step 3's aggregate came due (τ = 1)
        return str(e)
    return "no error"


def test_raise_names_step_and_rank(pool: RankPool) -> None:
    for msg in pool.run(_wrapper_raise):
        assert f"step {BAD_STEP}" in msg and f"[{BAD_RANK}]" in msg




def test_hook_skip_does_not_step(pool: RankPool) -> None:
    # DDP exchanges during backward, so the NaN is put into the loss, not into p.grad.
    out = pool.run(_hook_skip_in_loss)
    for ready, equal, changed in out:
        # warm-up step 0, fill step 1 (τ 0 -> 1), step 3's aggregate is due at step 4
        assert ready == [True, False, True, True, False, True, True, True]
        assert changed == ready
        assert equal


def _hook_skip_in_loss(rank: int, world: int) -> tuple[list[bool], bool, list[bool]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deco_sgd.hook import attach_ddp

    ddp = DDP(T.make_model(), bucket_cap_mb=0.0005)
    opt = attach_ddp(ddp, torch.optim.SGD(ddp.parameters(), lr=T.LR, momentum=T.MOMENTUM),
                     _cfg(ratio=0.25, staleness=1, warmup_steps=1))
    ready, changed = [], []
    for s in range(STEPS):
        before = T.params(ddp)
        opt.zero_grad()
        loss = T.loss_fn(ddp, rank, s)
        if rank == BAD_RANK and s == BAD_STEP:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        ready.append(opt.state.ready)
        after = T.params(ddp)
        changed.append(any(not torch.equal(before[n], after[n]) for n in before))
        assert all(torch.isfinite(r).all() for r in (opt.state.ef.residual(n) for n in opt.state.names)
                   if r is not None)
    return ready, T.replicas_equal(ddp), changed


# -- a dead peer ------------------------------------------------------------------------


def _warm_and_align(model: torch.nn.Module) -> None:
    """A throw-away local forward/backward (first-call costs), then a barrier on the patient
    default group: DeCo's short timeout then measures a dead peer, not ranks that reached
    their first exchange seconds apart on a loaded host."""
    T.loss_fn(model, 0, 0).backward()
    model.zero_grad(set_to_none=True)
    torch.distributed.barrier()


def _die_midrun(rank: int, world: int) -> tuple[str, str, float]:
    import os

    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    _warm_and_align(model)
    state = DecoState(_cfg(ratio=0.25, staleness=1, timeout_s=DEAD_TIMEOUT_S), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), state)
    t0 = time.monotonic()
    try:
        for s in range(STEPS):
            if rank == 1 and s == BAD_STEP:
                os._exit(3)
            t0 = time.monotonic()
            opt.zero_grad()
            T.loss_fn(model, rank, s).backward()
            opt.step()
    except Exception as e:  # the test checks the type by name: the pool pickles the result
        return type(e).__name__, str(e), time.monotonic() - t0
    return "none", "", time.monotonic() - t0


@pytest.mark.timing
def test_dead_peer_raises_within_timeout() -> None:
    name, msg, elapsed = _dead_peer_run(_die_midrun)
    assert name == "DecoCommError", (name, msg)
    assert f"step={BAD_STEP}" in msg or f"step={BAD_STEP - 1}" in msg, msg
    assert elapsed < DEAD_TIMEOUT_S + DEAD_SLACK_S, elapsed


def _mismatched_layout(rank: int, world: int) -> str:
    from deco_sgd.state import DecoState

    model = T.make_model()
    if rank == 1:
        model = torch.nn.Sequential(torch.nn.Linear(T.IN, T.HID + 1), torch.nn.Tanh(), torch.nn.Linear(T.HID + 1, T.OUT))
    try:
        DecoState(_cfg(ratio=0.25), model)
    except ValueError as e:
        return str(e)
    return "accepted"


def test_mismatched_parameters_name_rank_and_parameter(pool: RankPool) -> None:
    msgs = pool.run(_mismatched_layout)
    assert "rank 1" in msgs[0] and "0.weight" in msgs[0], msgs[0]
    assert "rank 0" in msgs[1] and "0.weight" in msgs[1], msgs[1]


def _always_nan(rank: int, world: int, max_skips: int) -> tuple[str, int, bool]:
    from deco_sgd.errors import NonFiniteGradientError
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    state = DecoState(_cfg(ratio=0.25, max_consecutive_skips=max_skips), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), state)
    before = T.params(model)
    try:
        for s in range(3 * max_skips):
            opt.zero_grad()
            T.loss_fn(model, rank, s).backward()
            if rank == BAD_RANK:
                next(model.parameters()).grad.fill_(float("inf"))
            opt.step()
    except NonFiniteGradientError as e:
        unchanged = all(torch.equal(before[n], p) for n, p in T.params(model).items())
        return str(e), state.fifo.skipped, unchanged
    return "no error", state.fifo.skipped, False


def test_too_many_consecutive_skips_raise(pool: RankPool) -> None:
    for msg, skipped, unchanged in pool.run(_always_nan, 3):
        assert "max_consecutive_skips=3" in msg
        assert skipped == 4 and unchanged


def _hook_die_midrun(rank: int, world: int) -> tuple[str, str, float]:
    import os

    from torch.nn.parallel import DistributedDataParallel as DDP

    from deco_sgd.hook import attach_ddp

    model = T.make_model()
    _warm_and_align(model)  # before DDP wraps it: DDP's own hooks would see this backward
    ddp = DDP(model, bucket_cap_mb=0.0005)
    torch.distributed.barrier()
    opt = attach_ddp(ddp, torch.optim.SGD(ddp.parameters(), lr=T.LR),
                     _cfg(ratio=0.25, staleness=1, warmup_steps=1, timeout_s=DEAD_TIMEOUT_S))
    t0 = time.monotonic()
    try:
        for s in range(STEPS):
            if rank == 1 and s == BAD_STEP:
                os._exit(3)
            t0 = time.monotonic()
            opt.zero_grad()
            T.loss_fn(ddp, rank, s).backward()
            opt.step()
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "none", "", time.monotonic() - t0


@pytest.mark.timing
def test_hook_dead_peer_raises_within_timeout() -> None:
    name, msg, elapsed = _dead_peer_run(_hook_die_midrun)
    # DDP re-raises the hook future's error from backward as a RuntimeError; the message
    # still carries the DeCo context.
    assert "DecoCommError" in name + msg, (name, msg)
    assert elapsed < DEAD_TIMEOUT_S + DEAD_SLACK_S, elapsed
