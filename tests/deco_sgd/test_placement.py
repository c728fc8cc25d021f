"""Where DeCo-SGD's traffic goes: data on the caller's group (default: the default group and its
backend, NCCL on GPUs), control on DecoState's own gloo group. Both placements run on CPU here."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from ccomm.ranks import RankPool

try:
    from . import _train as T
except ImportError:
    import _train as T

pytestmark = pytest.mark.multiprocess

STEPS = 6


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2, group_timeout_s=30.0) as p:
        yield p


def _train_with(rank: int, world: int, placement: str) -> dict[str, Any]:
    import torch.distributed as dist

    from ccomm import stats
    from deco_sgd import DecoConfig
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    cfg = DecoConfig(mode="static", codec="topk", ratio=0.1, staleness=1, warmup_steps=0, timeout_s=30.0)
    model = T.make_model()
    given = dist.new_group(backend="gloo") if placement == "given" else None
    st = DecoState(cfg, model, group=given)
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), st)
    before = stats.snapshot()
    for s in range(STEPS):
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        opt.step()
    sent = (stats.total(stats.snapshot()) - stats.total(before)).bytes
    out = {"default_group": st.group is dist.group.WORLD, "given_group": given is not None and st.group is given,
           "control_backend": dist.get_backend(st.control_group),
           "control_is_data": st.control_group is st.group, "sent": sent}
    opt.close()
    # close() releases only the groups the state created: the caller's groups still work.
    x = torch.ones(1)
    dist.all_reduce(x)
    if given is not None:
        dist.all_reduce(x, group=given)
        dist.destroy_process_group(given)
    out["after_close"] = float(x)
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def test_data_on_callers_group_control_on_gloo(pool: RankPool) -> None:
    default = pool.run(_train_with, "default")
    given = pool.run(_train_with, "given")
    for r in default:
        assert r["default_group"] and not r["given_group"]
        assert r["control_backend"] == "gloo" and not r["control_is_data"]
        assert r["sent"] > 0 and r["after_close"] == 2.0
    for r in given:
        assert r["given_group"] and not r["default_group"]
        assert r["control_backend"] == "gloo" and not r["control_is_data"]
        assert r["after_close"] == 4.0
    # The placement moves the traffic, never the arithmetic: identical models either way,
    # and the same bytes on the wire.
    for a, b in zip(default, given):
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
        assert a["sent"] == b["sent"]
