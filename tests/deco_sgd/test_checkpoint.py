"""Exact resume (docs/design/deco_sgd.md#checkpoints): save at step s, resume in fresh objects, 20 more
steps are bit-identical; a checkpoint that does not fit (another rank, model or config, NaN, bad step) fails at load."""
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
    # The usual PyTorch pattern: model and optimizer state dicts; DeCo's state rides in the latter.
    torch.save({"model": T.params(model), "opt": opt.state_dict()}, blob)
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
        assert "config fingerprint" in msg


# --- checkpoints that cannot be loaded wrong (issue 13, item 4) ------------------------------

def _trained(rank: int, steps: int = 3, model_seed: int = 0) -> tuple[Any, Any, dict]:
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model = T.make_model(model_seed)
    st = DecoState(_cfg(), model)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), st)
    _steps(model, opt, rank, 0, steps)
    return model, opt, st.state_dict()


def _corrupt(sd: dict, what: str, rank: int) -> dict:
    import copy

    sd = copy.deepcopy(sd)
    name = next(iter(sd["ef"]["residuals"]))
    if what == "nan_residual":
        sd["ef"]["residuals"][name].view(-1)[0] = float("nan")
    elif what == "shape":
        sd["ef"]["residuals"][name] = torch.zeros(3, 3)
    elif what == "dtype":
        sd["ef"]["residuals"][name] = sd["ef"]["residuals"][name].double()
    elif what == "unknown_param":
        sd["ef"]["residuals"]["no.such.weight"] = torch.zeros(2)
    elif what == "negative_step":
        sd["step"] = -1
    elif what == "float_step":
        sd["step"] = 2.5
    elif what == "world_size":
        sd["world_size"] = 3
    elif what == "nan_aggregate":
        unit = sd["fifo"]["entries"][0]["units"][0]
        unit["result"][unit["names"][0]].view(-1)[0] = float("nan")
    elif what == "queued_after_step":
        sd["fifo"]["entries"][0]["seq"] = sd["step"]
    elif what == "missing":
        del sd["fifo"]
    return sd


CORRUPTIONS = {
    "nan_residual": r"state\.ef\.residuals\['0\.weight'\]: holds inf or NaN",
    "shape": r"shape \(3, 3\) differs from the parameter's",
    "dtype": r"dtype torch\.float64 differs from the parameter's torch\.float32",
    "unknown_param": r"unknown parameter\(s\) \['no\.such\.weight'\]",
    "negative_step": r"state\.step: must be an integer >= 0, got -1",
    "float_step": r"state\.step: must be an integer >= 0, got 2\.5",
    "world_size": r"saved with world_size=3, running with 2",
    "nan_aggregate": r"result\['0\.weight'\] \(step \d+\): holds inf or NaN",
    "queued_after_step": r"is not before state\.step",
    "missing": r"state: missing \['fifo'\]",
}


def _load_corrupted(rank: int, world: int) -> dict[str, str]:
    from deco_sgd import CheckpointError
    from deco_sgd.state import DecoState

    _, _, sd = _trained(rank)
    assert sd["fifo"]["entries"], "the checkpoint must hold in-flight aggregates for these checks"
    out = {}
    for what in CORRUPTIONS:
        fresh = DecoState(_cfg(), T.make_model())
        try:
            fresh.load_state_dict(_corrupt(sd, what, rank))
        except CheckpointError as e:
            out[what] = str(e)
        else:
            out[what] = "loaded"
        assert fresh.step == 0 and len(fresh.ef) == 0  # nothing was loaded
    return out


def test_bad_checkpoints_fail_at_load_naming_the_field(pool: RankPool) -> None:
    import re

    for got in pool.run(_load_corrupted):
        for what, pattern in CORRUPTIONS.items():
            assert re.search(pattern, got[what]), (what, got[what])


def _load_other(rank: int, world: int) -> tuple[str, str, str]:
    import torch.distributed as dist

    from deco_sgd import CheckpointError
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    model, opt, sd = _trained(rank)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, sd)
    fresh = DecoState(_cfg(), T.make_model())
    try:
        fresh.load_state_dict(everyone[(rank + 1) % world])  # the other rank's file
        other_rank = "loaded"
    except CheckpointError as e:
        other_rank = str(e)
    # Another model: same names and config, other widths (a wider hidden layer).
    wide = torch.nn.Sequential(torch.nn.Linear(T.IN, 2 * T.HID), torch.nn.Tanh(), torch.nn.Linear(2 * T.HID, T.OUT))
    try:
        DecoState(_cfg(), wide).load_state_dict(sd)
        other_model = "loaded"
    except CheckpointError as e:
        other_model = str(e)
    # A plain optimizer state dict is refused, not loaded without DeCo's state.
    opt2 = DecoOptimizer(torch.optim.SGD(T.make_model().parameters(), lr=T.LR), DecoState(_cfg(), T.make_model()))
    try:
        opt2.load_state_dict(opt.optimizer.state_dict())
        plain = "loaded"
    except ValueError as e:
        plain = str(e)
    return other_rank, other_model, plain


def test_another_ranks_or_models_checkpoint_and_a_plain_optimizer_dict_are_refused(pool: RankPool) -> None:
    for rank, (other_rank, other_model, plain) in enumerate(pool.run(_load_other)):
        assert f"this is rank {1 - rank}'s checkpoint, loaded on rank {rank}" in other_rank
        assert "differs from the parameter's" in other_model and "another model" in other_model
        assert "plain torch optimizer state dict has no DeCo state" in plain


def _optimizer_dict_holds_deco(rank: int, world: int) -> tuple[list[str], int, int]:
    _, opt, _ = _trained(rank)
    sd = opt.state_dict()
    return sorted(sd), len(sd["deco"]["ef"]["residuals"]), len(sd["deco"]["fifo"]["entries"])


def test_optimizer_state_dict_includes_the_deco_state(pool: RankPool) -> None:
    for keys, residuals, queued in pool.run(_optimizer_dict_holds_deco):
        assert keys == ["deco", "format", "optimizer"]
        assert residuals == 4 and queued == 2  # 4 parameters; staleness 2 keeps 2 steps in flight
