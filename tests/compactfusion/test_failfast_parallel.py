"""Issue 13 item 2: with mode="distrifusion" and NaN tokens on one rank, that rank raises and
the healthy rank raises within seconds naming it, instead of waiting out the group timeout."""
from __future__ import annotations

import re
import time

import pytest

from _harness import forward, model_inputs, run_ranks, tiny_model

pytestmark = pytest.mark.multiprocess

#: The issue asks for about a second; a busy two-core host gets slack, still far below the
#: group timeout below, which the healthy rank used to sit out.
FAST_S = 5.0
GROUP_TIMEOUT_S = 60.0


def _r_nan_on_rank_1(rank: int, world: int, mode: str, steps_before: int) -> None:
    import torch

    import compactfusion as cf

    model = tiny_model("dit")
    cf.parallelize(model, cf.CompactConfig(mode=mode, codec="int2", raw_steps=1))
    import torch.distributed as dist

    from ccomm.failfast import PeerError

    inp = model_inputs("dit")
    for i in range(steps_before + 1):  # denoising steps: the timestep decreases, one request
        step_in = dict(inp, timestep=torch.full_like(inp["timestep"], 900 - 100 * i))
        if i < steps_before:
            forward(model, step_in)
            continue
        if rank == 1:
            step_in["hidden_states"] = torch.full_like(inp["hidden_states"], float("nan"))
        dist.barrier()  # both ranks start the failing step together
        t0 = time.monotonic()
        try:
            forward(model, step_in)
        except PeerError as e:
            raise PeerError(e.rank, f"{e.reason} [waited={time.monotonic() - t0:.3f}s]", "forward") from e


@pytest.mark.parametrize("mode, steps_before", [("distrifusion", 2), ("ring", 2), ("patch", 2), ("distrifusion", 0)])
def test_healthy_rank_raises_fast_naming_the_failed_rank(mode: str, steps_before: int) -> None:
    """After warm-up distrifusion uses last step's K/V, so rank 0 only learns of rank 1's
    failure from its post; in a synchronous exchange (warm-up, ring, patch) rank 0 may also
    see rank 1's NaN K/V itself first. Either way: the real cause, fast."""
    from ccomm.ranks import RankError

    with pytest.raises(RankError) as err:
        run_ranks(_r_nan_on_rank_1, 2, mode, steps_before, group_timeout_s=GROUP_TIMEOUT_S, timeout=180)
    msg = str(err.value)
    rank0 = msg.split("--- rank 0 ---")[1].split("--- rank 1 ---")[0]
    posted = "PeerError" in rank0 and "rank 1 failed and will not take part: FloatingPointError: non-finite K/V" in rank0
    seen = "FloatingPointError: non-finite K/V" in rank0 and "source=1" in rank0
    assert posted or (seen and (mode != "distrifusion" or steps_before == 0)), rank0
    assert "Timed out" not in rank0 and "timeout" not in rank0.lower().replace("group_timeout", "")
    if posted:
        after = float(re.search(r"\[waited=([0-9.]+)s\]", rank0).group(1))
        assert after < FAST_S, after
