"""The adaptive loop on 2 ranks: identical decisions, applied at the same step, desync caught
(docs/design/deco_sgd.md#decisions-across-ranks)."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import pytest
import torch

from ccomm.ranks import RankPool

try:
    from . import _train as T
except ImportError:
    import _train as T

pytestmark = pytest.mark.multiprocess

STEPS = 24
WARMUP = 4


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2, group_timeout_s=30.0) as p:
        yield p


def _cfg(**kw: Any) -> Any:
    from deco_sgd import DecoConfig

    return DecoConfig(**{"mode": "adaptive", "codec": "topk", "ratio": 1.0, "warmup_steps": WARMUP, "measure_every": 2,
                         "decide_every": 4, "min_dwell_steps": 0, "hysteresis": 0.0, "timeout_s": 30.0, **kw})


def _build(hook: bool, cfg: Any) -> tuple[torch.nn.Module, Any]:
    from deco_sgd.hook import attach_ddp
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    if hook:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model: torch.nn.Module = DDP(T.make_model(), bucket_cap_mb=0.0005)
        return model, attach_ddp(model, torch.optim.SGD(model.parameters(), lr=T.LR), cfg)
    model = T.make_model()
    return model, DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), DecoState(cfg, model))


def _run(rank: int, world: int, hook: bool, force: tuple[float, int] | None) -> dict[str, Any]:
    model, opt = _build(hook, _cfg())
    drv = opt.state.driver
    if force is not None:
        # Replace the first evaluated decision by a switch: timing on loopback cannot be
        # steered, but the seam (schedule at the next step on every rank) can be checked.
        real = drv.controller.decide

        def decide(m: Any, current: Any, step: int) -> Any:
            d = real(m, current, step)
            if not any(x.changed for x in drv.log) and d.trigger != "warmup":
                d = dataclasses.replace(d, ratio=force[0], staleness=force[1], changed=True, outcome="switch")
            return d

        drv.controller.decide = decide
    points = []
    for s in range(STEPS):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        opt.step()
        points.append((opt.state.ratio, opt.state.staleness))
    opt.close()
    return {
        "log": [d.as_dict() for d in drv.log],
        "decisions": [(d["step"], d["ratio"], d["staleness"]) for d in opt.state.decisions],
        "points": points,
        "known": (drv.comp.value, drv.bw.value, drv.lat.value("allreduce"), drv.lat.value("allgather"), drv.grad.r),
        "equal": T.replicas_equal(model),
        "fifo": len(opt.state.fifo),  # 0: close() flushed it
    }


@pytest.mark.parametrize("hook", [False, True], ids=["wrapper", "hook"])
def test_controller_runs_identically_on_every_rank(pool: RankPool, hook: bool) -> None:
    out = pool.run(_run, hook, None)
    a, b = out
    assert a["log"] and a["log"] == b["log"]  # same measurements, same decisions, bit for bit
    assert a["log"][0]["trigger"] == "initial" and a["log"][0]["step"] >= WARMUP
    assert a["decisions"] == b["decisions"] and a["points"] == b["points"]
    assert all(v is not None for v in a["known"]), a["known"]
    assert a["equal"] and b["equal"]


@pytest.mark.parametrize("hook", [False, True], ids=["wrapper", "hook"])
def test_switch_applies_at_next_step_everywhere(pool: RankPool, hook: bool) -> None:
    out = pool.run(_run, hook, (0.25, 2))
    a, b = out
    assert a["decisions"] == b["decisions"] and len(a["decisions"]) >= 1
    s_apply, ratio, tau = a["decisions"][0]
    assert (ratio, tau) == (0.25, 2)
    switch = next(d for d in a["log"] if d["changed"])
    assert s_apply == switch["step"]  # decided at the end of step s-1, applied from step s
    # points[s] is the point in force during step s: the old one up to s_apply - 1, then
    # whatever the latest decision applied at or before s says (the real controller may
    # switch back later).
    assert a["points"][s_apply - 1] == (1.0, 0) and a["points"][s_apply] == (0.25, 2)
    for s, point in enumerate(a["points"]):
        latest = [(r, t) for at, r, t in a["decisions"] if at <= s]
        assert point == (latest[-1] if latest else (1.0, 0))
    assert a["equal"] and b["equal"]


def _desync(rank: int, world: int) -> str:
    from deco_sgd.errors import DecoDesyncError

    model, opt = _build(False, _cfg())
    try:
        for s in range(STEPS):
            if rank == 1 and s == 3 * WARMUP - 1:  # mid-period: no decision applies at this step
                # A bug on one rank only. τ, not δ: a different δ changes the data collective
                # itself, which the group timeout reports (DecoCommError) before any check.
                opt.state.staleness += 2
            opt.zero_grad()
            T.loss_fn(model, rank, s).backward()
            opt.step()
    except DecoDesyncError as e:
        return str(e)
    return "no error"


def test_desync_is_detected(pool: RankPool) -> None:
    for msg in pool.run(_desync):
        assert "different (ratio, staleness)" in msg


def _adaptive_checkpoint(rank: int, world: int) -> tuple[dict, dict, int, int, dict, dict]:
    # Every exchange may give a bandwidth sample (no latency-share filter), so the controller
    # has measured B and remembered a decision by the checkpoint at step 12. Compressed from
    # the start (δ = 0.1), so a gap reading exists to be saved.
    model, opt = _build(False, _cfg(bw_min_transfer_frac=0.0, ratio=0.1))
    for s in range(12):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        opt.step()
    sd = opt.state.state_dict()
    model2, opt2 = _build(False, _cfg(bw_min_transfer_frac=0.0, ratio=0.1))
    opt2.state.load_state_dict(sd)
    a, b = opt.state.driver, opt2.state.driver
    conv_loaded = b.convergence_state_dict()
    for s in range(12, 16):  # the resumed run keeps going (and keeps its control exchange in step)
        opt2.zero_grad()
        T.loss_fn(model2, rank, s).backward()
        opt2.step()
    opt2.close()
    return (a.controller.state_dict(), sd["driver"]["controller"], len(sd["driver"]["log"]), len(b.log),
            sd["driver"]["convergence"], conv_loaded)


def test_adaptive_state_round_trips(pool: RankPool) -> None:
    for saved_ctrl, in_ckpt, n_saved, n_after, conv_saved, conv_loaded in pool.run(_adaptive_checkpoint):
        assert saved_ctrl == in_ckpt and saved_ctrl["last_step"] is not None
        assert n_saved >= 1 and n_after >= 1
        # The measured convergence inputs, the gap readings of every point run included.
        assert conv_saved["gaps"] and conv_loaded == conv_saved, conv_saved
