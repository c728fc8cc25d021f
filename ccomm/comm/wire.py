"""Wire headers in the transport: build, exchange and check them (`ccomm.header`).

Where a call already learns its peers' sizes (``same_size=False`` gathers, `send_recv`
without ``recv_nbytes``, the log-depth gathers' per-block headers), the wire header
replaces the int64 size at no extra step. Where the caller promises the sizes
(``same_size=True``, ``recv_nbytes``, all-reduce), ``check=True`` adds one header
exchange before the data (`exchange_headers`); it uses the call's own algorithm family,
so a log-depth call's header step is log-depth too. Every rank sees the same headers in
a gather, so a mismatch raises the same `HeaderMismatchError` on every rank, and it is
raised before the backend sees buffers of unequal sizes (which gloo answers with an abort).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..header import HEADER_BYTES, WireHeader, check_peers
from ..payload import Payload, PayloadMeta
from ..stats import CommStats

__all__ = ["header_of", "exchange_headers", "check_gathered"]


def header_of(payload: Payload) -> WireHeader:
    """The wire header of `payload` as this rank sends it."""
    return WireHeader.of(payload.meta, payload.buffer.dtype, payload.nbytes)


def exchange_headers(
    payload: Payload, group: dist.ProcessGroup | None, rank: int, world: int, algo: str, what: str,
    st: CommStats, op: str, key: str | None,
) -> list[torch.Tensor]:
    """Every rank's packed header, in group-rank order (blocking; counted as header bytes).

    ``algo="ring"`` uses the backend's all-gather; any other algorithm the log-depth
    Bruck gather, so the header step costs ceil(log2 n) latencies like the call itself.
    """
    from ._handle import issue
    from .loggather import log_allgather

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
    from ..schedule import allgather_rounds

    return sum(len(t.blocks) for rnd in allgather_rounds(algo, world) for t in rnd if t.src == rank)


def check_gathered(payload: Payload, heads: list[Any], rank: int, what: str, key: str | None,
                   same_size: bool) -> list[WireHeader]:
    """Unpack and check every rank's header against this rank's; returns them (rank order).

    The error names the call by function and key only (`what`'s byte count and algorithm
    may differ between ranks), so every rank raises the very same message.
    """
    common = f"{what.split('(', 1)[0]}(key={key!r})"
    return check_peers(header_of(payload), heads, rank=rank, what=common, same_size=same_size)
