"""§6 exact resume: save at step s, resume in fresh objects, 20 more steps are bit-identical."""
from __future__ import annotations

import io
from typing import Any, Iterator

import pytest
import torch

from ccomm.ranks import RankPool

try:
    from . import _train as T
except ImportError:
    import _train as T

pytestmark = pytest.mark.multiprocess

SAVE_AT = 10
MORE = 20


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2, group_timeout_s=30.0) as p:
        yield p


def _cfg(**kw: Any) -> Any:
    from deco_sgd import DecoConfig

    return DecoConfig(**{"mode": "static", "codec": "topk", "ratio": 0.25, "staleness": 2,
                         "warmup_steps": 0, "timeout_s": 30.0, **kw})


def _build(hook: bool, cfg: Any) -> tuple[torch.nn.Module, Any]:
    from deco_sgd.hook import attach_ddp
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    if hook:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model: torch.nn.Module = DDP(T.make_model(), bucket_cap_mb=0.0005)
        return model, attach_ddp(model, torch.optim.SGD(model.parameters(), lr=T.LR, momentum=T.MOMENTUM), cfg)
    model = T.make_model()
    inner = torch.optim.SGD(model.parameters(), lr=T.LR, momentum=T.MOMENTUM)
    return model, DecoOptimizer(inner, DecoState(cfg, model))


def _steps(model: torch.nn.Module, opt: Any, rank: int, start: int, stop: int) -> None:
    for s in range(start, stop):
        opt.zero_grad()
        # A draw from the global RNG scales the loss, so the resume must restore the RNG too.
        scale = 1.0 + 0.1 * torch.rand(())
        (scale * T.loss_fn(model, rank, s)).backward()
        opt.step()


def _resume(rank: int, world: int, hook: bool, cfg_kw: dict) -> tuple[bool, list[str], int]:
    cfg = _cfg(**cfg_kw)
    drain = cfg.checkpoint_queue == "drain"
    model, opt = _build(hook, cfg)
    _steps(model, opt, rank, 0, SAVE_AT)
    if drain:
        opt.drain()
    _steps(model, opt, rank, SAVE_AT, SAVE_AT + MORE)
    straight = T.params(model)

    model, opt = _build(hook, cfg)
    _steps(model, opt, rank, 0, SAVE_AT)
    inflight = len(opt.state.fifo)
    if drain:
        try:
            opt.state.state_dict()
        except ValueError:
            pass
        else:
            raise AssertionError("drain mode saved a non-empty FIFO")
        opt.drain()
    blob = io.BytesIO()
    torch.save({"model": T.params(model), "opt": opt.state_dict(), "deco": opt.state.state_dict()}, blob)
    torch.randn(100)  # the resumed run must not depend on RNG use after the save
    # Keep training the old objects a little: the checkpoint must be a copy, not a view.
    _steps(model, opt, rank, SAVE_AT, SAVE_AT + 2)
    opt.close()
    ck = torch.load(io.BytesIO(blob.getvalue()), weights_only=False)

    model2, opt2 = _build(hook, cfg)
    inner = model2.module if hook else model2
    with torch.no_grad():
        for n, p in inner.named_parameters():
            p.copy_(ck["model"][n])
    opt2.load_state_dict(ck["opt"])
    opt2.state.load_state_dict(ck["deco"])
    _steps(model2, opt2, rank, SAVE_AT, SAVE_AT + MORE)
    resumed = T.params(model2)
    diff = [n for n in straight if not torch.equal(straight[n], resumed[n])]
    return True, diff, inflight


@pytest.mark.parametrize("hook", [False, True], ids=["wrapper", "hook"])
def test_resume_is_bitwise(pool: RankPool, hook: bool) -> None:
    kw = {"warmup_steps": 2} if hook else {}
    out = pool.run(_resume, hook, kw)
    for ok, diff, inflight in out:
        assert inflight == 2  # the snapshot really held in-flight exchanges
        assert diff == []


def test_resume_after_drain_is_bitwise(pool: RankPool) -> None:
    for ok, diff, inflight in pool.run(_resume, False, {"checkpoint_queue": "drain"}):
        assert inflight == 2
        assert diff == []


def _mismatch(rank: int, world: int) -> str:
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model()
    st = DecoState(_cfg(), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), st)
    _steps(model, opt, rank, 0, 3)
    sd = st.state_dict()
    other = DecoState(_cfg(ratio=0.5), model)
    try:
        other.load_state_dict(sd)
    except ValueError as e:
        return str(e)
    return "loaded"


def test_config_mismatch_is_refused(pool: RankPool) -> None:
    for msg in pool.run(_mismatch):
        assert "config hash" in msg
