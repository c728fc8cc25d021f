"""The header step of ``check=True`` calls whose sizes the caller promised (`ccomm.comm.wire`).

Apart from `ccomm.comm.wire` because it runs a gather itself: the log-depth gather
(`ccomm.comm.loggather`) checks its per-block headers with `wire`, and this step uses that
gather, so keeping both here and in `wire` would make the two modules import each other.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..header import HEADER_BYTES
from ..payload import Payload, PayloadMeta
from ..schedule import allgather_rounds
from ..stats import CommStats
from ._handle import issue
from .loggather import log_allgather
from .wire import header_of

__all__ = ["exchange_headers"]


def exchange_headers(
    payload: Payload, group: dist.ProcessGroup | None, rank: int, world: int, algo: str, what: str,
    st: CommStats, op: str, key: str | None,
) -> list[torch.Tensor]:
    """Every rank's packed header, in group-rank order (blocking; counted as header bytes).

    ``algo="ring"`` uses the backend's all-gather; any other algorithm the log-depth
    Bruck gather, so the header step costs ceil(log2 n) latencies like the call itself.
    """
    mine = header_of(payload).pack(payload.buffer.device)
    where = what + " [headers]"
    if algo == "ring":
        st.record(op, key, header_bytes=HEADER_BYTES, calls=0, algo=algo)
        heads = [torch.empty_like(mine) for _ in range(world)]
        issue(where, lambda: dist.all_gather(heads, mine, group=group))
        return heads
    scratch = CommStats()  # the gather's own bookkeeping; its bytes are this call's header bytes
    handle = log_allgather(Payload(mine, PayloadMeta(mine.shape, mine.dtype)), group, rank, world, "bruck",
                           True, False, where, scratch, None)
    st.record(op, key, header_bytes=HEADER_BYTES * _blocks_sent("bruck", world, rank), calls=0, algo=algo)
    return [p.buffer for p in handle.wait()]


def _blocks_sent(algo: str, world: int, rank: int) -> int:
    return sum(len(t.blocks) for rnd in allgather_rounds(algo, world) for t in rnd if t.src == rank)
