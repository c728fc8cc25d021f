"""Wire headers in the transport: build, exchange and check them (`ccomm.header`).

Where a call already learns its peers' sizes (``same_size=False`` gathers, `send_recv`
without ``recv_nbytes``, the log-depth gathers' per-block headers), the wire header
replaces the int64 size at no extra step. Where the caller promises the sizes
(``same_size=True``, ``recv_nbytes``, all-reduce), ``check=True`` adds one header
exchange before the data (`ccomm.comm.header_exchange.exchange_headers`); it uses the call's own algorithm family,
so a log-depth call's header step is log-depth too. Every rank sees the same headers in
a gather, so a mismatch raises the same `HeaderMismatchError` on every rank, and it is
raised before the backend sees buffers of unequal sizes (which gloo answers with an abort).
"""
from __future__ import annotations

from typing import Any

from ..header import WireHeader, check_peers
from ..payload import Payload

__all__ = ["header_of", "check_gathered"]


def header_of(payload: Payload) -> WireHeader:
    """The wire header of `payload` as this rank sends it."""
    return WireHeader.of(payload.meta, payload.buffer.dtype, payload.nbytes)


def check_gathered(payload: Payload, heads: list[Any], rank: int, what: str, key: str | None,
                   same_size: bool) -> list[WireHeader]:
    """Unpack and check every rank's header against this rank's; returns them (rank order).

    The error names the call by function and key only (`what`'s byte count and algorithm
    may differ between ranks), so every rank raises the very same message.
    """
    common = f"{what.split('(', 1)[0]}(key={key!r})"
    return check_peers(header_of(payload), heads, rank=rank, what=common, same_size=same_size)
