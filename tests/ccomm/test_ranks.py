"""`ccomm.ranks`: argument checks, the context factory, kwargs, and results that outlive ranks.

(Rank errors, hangs and dead peers are covered by the harness tests in test_comm.py.)
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from ccomm.ranks import RankError, RankPool, run_ranks


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"n": 0}, "n"), ({"n": True}, "n"), ({"n": 2, "threads": 0}, "threads"),
     ({"n": 2, "group_timeout_s": 0}, "group_timeout_s"), ({"n": 2, "start_timeout_s": -1.0}, "start_timeout_s")],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: must be"):
        RankPool(**kwargs)


def test_run_ranks_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="^timeout: must be"):
        run_ranks(_r_sum, 2, timeout=0)


def _r_sum(rank: int, n: int, scale: float = 1.0) -> torch.Tensor:
    import torch.distributed as dist

    t = torch.full((3,), float(rank + 1))
    dist.all_reduce(t)
    return t * scale  # a tensor result, returned by pickle


def _ctx(rank: int, n: int) -> dict[str, Any]:
    return {"rank": rank, "n": n, "hits": 0}


def _r_with_ctx(ctx: dict[str, Any], bump: int) -> tuple[int, int, int]:
    ctx["hits"] += bump  # the context persists between jobs on a rank
    return ctx["rank"], ctx["n"], ctx["hits"]


def _r_raise(rank: int, n: int) -> None:
    if rank == 1:
        raise KeyError("only rank 1")


@pytest.mark.multiprocess
def test_run_ranks_one_shot_returns_tensors_after_exit() -> None:
    out = run_ranks(_r_sum, 2, timeout=120.0, scale=2.0)
    # 1 + 2 summed over both ranks, times the keyword argument; valid after the ranks exited.
    for t in out:
        torch.testing.assert_close(t, torch.full((3,), 6.0))


@pytest.mark.multiprocess
def test_context_factory_persists_and_errors_close_the_pool() -> None:
    with RankPool(2, group_timeout_s=30.0, context=_ctx) as pool:
        assert pool.run(_r_with_ctx, 1, timeout=60.0) == [(0, 2, 1), (1, 2, 1)]
        assert pool.run(_r_with_ctx, 5, timeout=60.0) == [(0, 2, 6), (1, 2, 6)]
    assert pool.broken and not any(pool.alive())

    pool = RankPool(2, group_timeout_s=30.0)
    with pytest.raises(RankError, match=r"(?s)1 rank\(s\) failed:.*--- rank 1 ---.*KeyError: 'only rank 1'"):
        pool.run(_r_raise, timeout=60.0)
    assert pool.broken and not any(pool.alive())
