"""`send_recv`: one ring step, send to `dst` while receiving from `src`.

Deadlock-free because both transfers are posted before either is waited on. With an
unknown receive size, an int64 size header is exchanged first (blocking), because the
receive buffer cannot be allocated without it.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from ..payload import Payload, PayloadMeta
from ..schedule import HEADER_BYTES
from ..stats import CommStats, resolve
from ._handle import HEADER_DTYPE, CommError, CommHandle, check_payload, finish_sync, group_rank_and_size, issue

__all__ = ["send_recv"]

logger = logging.getLogger(__name__)


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _exchange(
    send_buf: torch.Tensor, recv_buf: torch.Tensor, dst: int, src: int, group: dist.ProcessGroup | None
) -> list[Any]:
    """Post the send and the receive together; both are in flight before either is waited on."""
    ops = [
        dist.P2POp(dist.isend, send_buf, dst, group=group),
        dist.P2POp(dist.irecv, recv_buf, src, group=group),
    ]
    return list(dist.batch_isend_irecv(ops))


def send_recv(
    payload: Payload,
    dst: int,
    src: int,
    group: dist.ProcessGroup | None = None,
    *,
    recv_nbytes: int | None = None,
    recv_dtype: torch.dtype | None = None,
    meta: PayloadMeta | None = None,
    async_op: bool = False,
    key: str | None = None,
    stats: CommStats | None = None,
) -> "Payload | CommHandle[Payload]":
    """Send `payload` to group rank `dst` and receive a payload from group rank `src`.

    A ring step: every rank calls it with `dst = rank + 1`, `src = rank - 1` (mod size)
    and no rank blocks the others. The received buffer has dtype `recv_dtype` (default:
    the sent buffer's) and `recv_nbytes` bytes; with `recv_nbytes=None` each rank first
    sends its size as an int64 header (blocking, counted in `ccomm.stats`). The result is
    wrapped with `meta` (default: the local `payload.meta`).
    With `dst == src ==` this rank (a ring of one), the payload is copied locally and
    nothing is sent.
    """
    payload = check_payload(payload, "send_recv")
    rank, world = group_rank_and_size(group)
    for name, r in (("dst", dst), ("src", src)):
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world:
            raise ValueError(f"send_recv: {name}={r!r} must be a group rank in [0, {world - 1}]")
    if (dst == rank) != (src == rank):
        raise ValueError(
            f"send_recv: dst={dst}, src={src} on rank {rank}: a rank can only exchange with itself "
            "when both dst and src are itself"
        )
    buf = payload.buffer
    rdtype = buf.dtype if recv_dtype is None else recv_dtype
    esize = torch.empty((), dtype=rdtype).element_size()
    if recv_nbytes is not None:
        if isinstance(recv_nbytes, bool) or not isinstance(recv_nbytes, int) or recv_nbytes < 0:
            raise ValueError(f"send_recv: recv_nbytes={recv_nbytes!r} must be an integer >= 0 or None")
        if recv_nbytes % esize:
            raise ValueError(f"send_recv: recv_nbytes={recv_nbytes} is not a multiple of {rdtype}'s {esize} bytes")
    out_meta = payload.meta if meta is None else meta
    what = f"send_recv(key={key!r}, dst={dst}, src={src}, {payload.nbytes} bytes)"
    st = resolve(stats)

    if dst == rank:
        if recv_nbytes is not None and recv_nbytes != payload.nbytes:
            raise ValueError(f"send_recv: recv_nbytes={recv_nbytes} but this rank sends itself {payload.nbytes} bytes")
        # Ring of one: nothing goes through torch.distributed, so nothing is counted as sent.
        st.record("send_recv", key)
        local = buf.clone() if recv_dtype is None else buf.view(torch.uint8).clone().view(rdtype)
        done: CommHandle[Payload] = CommHandle([], lambda: Payload(local, out_meta), what)
        return finish_sync(done, async_op)

    gdst, gsrc = _global_rank(group, dst), _global_rank(group, src)
    calls = 1
    if recv_nbytes is None:
        header = torch.tensor([payload.nbytes], dtype=HEADER_DTYPE, device=buf.device)
        peer_header = torch.empty_like(header)
        st.record("send_recv", key, header_bytes=HEADER_BYTES)
        calls = 0  # this call is already counted
        works = issue(what + " [size exchange]", lambda: _exchange(header, peer_header, gdst, gsrc, group))
        CommHandle(works, lambda: None, what + " [size exchange]").wait()
        recv_nbytes = int(peer_header.item())
        if recv_nbytes % esize:
            raise CommError(
                f"{what}: rank {src} announced {recv_nbytes} bytes, not a multiple of {rdtype}'s {esize} bytes"
            )
    st.record("send_recv", key, payload_bytes=payload.nbytes, calls=calls)
    logger.debug("%s recv_nbytes=%d", what, recv_nbytes)
    recv = torch.empty(recv_nbytes // esize, dtype=rdtype, device=buf.device)
    works = issue(what, lambda: _exchange(buf, recv, gdst, gsrc, group))
    return finish_sync(CommHandle(works, lambda: Payload(recv, out_meta), what), async_op)
