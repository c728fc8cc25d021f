"""Issue 13 item 2 in DeCo-SGD: one rank leaving on an error makes the others raise within
seconds, naming it, instead of waiting out the group timeout in an exchange."""
from __future__ import annotations

import re
import time

import pytest
import torch

from ccomm.ranks import RankError, run_ranks

try:
    from . import _train as T
except ImportError:
    import _train as T

pytestmark = pytest.mark.multiprocess

FAST_S = 5.0
GROUP_TIMEOUT_S = 60.0


def _r_rank_1_dies_at_step_5(rank: int, world: int) -> None:
    import torch.distributed as dist

    from deco_sgd import DecoCommError, DecoConfig
    from deco_sgd.optim import DecoOptimizer
    from deco_sgd.state import DecoState

    cfg = DecoConfig(mode="static", codec="topk", ratio=0.25, staleness=2, warmup_steps=0, timeout_s=GROUP_TIMEOUT_S)
    model = T.make_model()
    opt = DecoOptimizer(torch.optim.SGD(model.parameters(), lr=T.LR), DecoState(cfg, model))
    for s in range(20):
        if s == 5:
            dist.barrier()
            t0 = time.monotonic()
            if rank == 1:
                raise OSError("data shard 17 is unreadable")
        opt.zero_grad()
        T.loss_fn(model, rank, s).backward()
        try:
            opt.step()
        except DecoCommError as e:
            raise RuntimeError(f"{e} [waited={time.monotonic() - t0:.3f}s, step {s}]") from e


def test_a_rank_dying_mid_training_fails_the_others_fast() -> None:
    with pytest.raises(RankError) as err:
        run_ranks(_r_rank_1_dies_at_step_5, 2, group_timeout_s=GROUP_TIMEOUT_S, timeout=180)
    msg = str(err.value)
    rank0 = msg.split("--- rank 0 ---")[1].split("--- rank 1 ---")[0]
    assert "rank 1 failed and will not take part: OSError: data shard 17 is unreadable" in rank0, rank0
    # staleness 2: step 5's exchange is first needed at step 7, where rank 0 waits for it
    waited, step = re.search(r"\[waited=([0-9.]+)s, step (\d+)\]", rank0).groups()
    assert float(waited) < FAST_S and int(step) == 7
