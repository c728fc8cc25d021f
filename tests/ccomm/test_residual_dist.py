"""ResidualCodec across 2 gloo ranks: every rank mirrors every other rank's base."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from ccomm.ranks import RankPool

pytestmark = pytest.mark.multiprocess

SHAPE = (32, 48)
STEPS = 20


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    with RankPool(2, group_timeout_s=30.0) as p:
        yield p


def _exchange_steps(rank: int, world: int, spec: str, dtype_name: str, corrupt: bool) -> int:
    """Each rank encodes its own drifting tensor; all ranks decode everyone's payloads."""
    import torch.distributed as dist

    from ccomm import ConsistencyError, ResidualCodec

    dtype = getattr(torch, dtype_name)
    rc = ResidualCodec(spec, raw_sends=1)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(SHAPE, generator=gen)
    checked = 0
    for _ in range(STEPS):
        x = x + 0.05 * torch.randn(SHAPE, generator=gen)
        own = x.to(dtype)
        # Sizes are known in advance on every rank: that is what lets receivers preallocate.
        nbytes = [rc.expected_nbytes(("kv", r), SHAPE, dtype) for r in range(world)]
        assert len(set(nbytes)) == 1
        payload = rc.encode(("kv", rank), own)
        assert payload.nbytes == nbytes[rank]
        mine = payload.buffer.reshape(-1).view(torch.uint8).contiguous()
        bufs = [torch.empty(nbytes[0], dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(bufs, mine)
        for r in range(world):
            if r != rank:
                rc.decode(("kv", r), rc.wrap(("kv", r), bufs[r], SHAPE, dtype))
        checked = rc.check_consistency()
    if corrupt:
        if rank == 1:
            base = rc.base(("kv", 0))
            assert base is not None
            rc._state[("kv", 0)].base = base.clone().index_fill_(0, torch.tensor([0]), 1.0)
        try:
            rc.check_consistency()
        except ConsistencyError as e:
            assert "kv" in str(e)
            return -1
        return 0
    return checked


@pytest.mark.parametrize("spec", ["int2", "binary", "lowrank:rank=4"])
def test_bases_identical_on_all_ranks_for_20_steps(pool: RankPool, spec: str) -> None:
    assert pool.run(_exchange_steps, spec, "float32", False) == [2, 2]


def test_bf16_bases_identical(pool: RankPool) -> None:
    assert pool.run(_exchange_steps, "int2", "bfloat16", False) == [2, 2]


def test_corrupted_base_is_detected_on_every_rank(pool: RankPool) -> None:
    assert pool.run(_exchange_steps, "int2", "float32", True) == [-1, -1]
