"""`send_recv`: one ring step, send to `dst` while receiving from `src`.

Deadlock-free because both transfers are posted before either is waited on. Each rank
checks the wire header (`ccomm.header`) of what it receives against what it expects
(codec, dtype, shape, and the size when it gives ``recv_nbytes``), so a peer with another
layout gives `HeaderMismatchError` naming both ranks, never a wrong buffer or a backend
abort:

1. ``recv_nbytes=None``: the headers are exchanged first (blocking), because the receive
   buffer cannot be allocated without the size they carry.
2. ``recv_nbytes`` given and ``check=True``: on CPU (gloo) the header and the data are
   sent together with the header's receive; the data's receive is posted once the header
   is in and checked, so the step still costs one latency. Elsewhere (NCCL) the header
   exchange is a step of its own.
3. ``check=False`` with ``recv_nbytes``: no header (a wrong size is then a backend error:
   gloo aborts on more bytes than posted and silently truncates fewer).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist

from ..failfast import wait_works
from ..header import HEADER_BYTES, HeaderMismatchError, WireHeader, check_peers
from ..payload import Payload, PayloadMeta
from ..stats import CommStats, resolve
from ._handle import CommError, CommHandle, check_payload, finish_sync, group_rank_and_size, issue, wrap_error
from .wire import header_of

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
    check: bool = True,
    async_op: bool = False,
    key: str | None = None,
    stats: CommStats | None = None,
) -> "Payload | CommHandle[Payload]":
    """Send `payload` to group rank `dst` and receive a payload from group rank `src`.

    A ring step: every rank calls it with `dst = rank + 1`, `src = rank - 1` (mod size)
    and no rank blocks the others. The received buffer has dtype `recv_dtype` (default:
    the sent buffer's) and `recv_nbytes` bytes; with `recv_nbytes=None` each rank first
    sends its size as an int64 header (blocking, counted in `ccomm.stats`). The result is
    wrapped with `meta` (default: the local `payload.meta`), which is also what the peer's
    wire header must match (see the module docstring; ``check=False`` skips the header when
    ``recv_nbytes`` is given). With `dst == src ==` this rank (a ring of one), the payload is copied locally and
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

    if not isinstance(check, bool):
        raise ValueError(f"send_recv: check={check!r} must be a bool")
    gdst, gsrc = _global_rank(group, dst), _global_rank(group, src)
    calls = 1
    expected = WireHeader.of(out_meta, rdtype, recv_nbytes or 0)
    pipelined = recv_nbytes is not None and check and buf.device.type == "cpu"
    sent: list[Any] = []
    if recv_nbytes is None or check:
        mine = header_of(payload).pack(buf.device)
        theirs = torch.empty_like(mine)
        st.record("send_recv", key, header_bytes=HEADER_BYTES)
        calls = 0  # this call is already counted
        where = what + " [header]"
        if pipelined:  # header and data leave together; the data's receive waits for the header
            st.record("send_recv", key, payload_bytes=payload.nbytes, calls=0)
            sent = issue(where, lambda: _post([(True, mine, gdst), (True, buf, gdst)], group))
            _wait(issue(where, lambda: _post([(False, theirs, gsrc)], group)), where)
        else:
            _wait(issue(where, lambda: _exchange(mine, theirs, gdst, gsrc, group)), where)
        peer = WireHeader.unpack(theirs, source=f"{what}: rank {src}")
        if recv_dtype is not None:  # the caller reinterprets the bytes: any buffer dtype will do
            expected = dataclasses.replace(expected, buffer_dtype=peer.buffer_dtype)
        try:
            check_peers(expected, [peer], rank=rank, peer_ranks=[src], what=what, same_size=recv_nbytes is not None)
            if peer.nbytes % esize:
                raise CommError(
                    f"{what}: rank {src} announced {peer.nbytes} bytes, not a multiple of {rdtype}'s {esize} bytes")
        except (HeaderMismatchError, CommError):
            # Finish the step with the announced sizes before raising, so the peers' transfers
            # complete and no rank is left waiting on this one.
            _drain(buf, peer.nbytes, gdst, gsrc, group, sent, where)
            raise
        recv_nbytes = peer.nbytes
    logger.debug("%s recv_nbytes=%d", what, recv_nbytes)
    recv = torch.empty(recv_nbytes // esize, dtype=rdtype, device=buf.device)
    if pipelined:
        works = sent + issue(what, lambda: _post([(False, recv, gsrc)], group))
    else:
        st.record("send_recv", key, payload_bytes=payload.nbytes, calls=calls)
        works = issue(what, lambda: _exchange(buf, recv, gdst, gsrc, group))
    return finish_sync(CommHandle(works, lambda: Payload(recv, out_meta), what), async_op)


def _post(ops: list[tuple[bool, torch.Tensor, int]], group: dist.ProcessGroup | None) -> list[Any]:
    """Post ``(is_send, tensor, global peer)`` operations together; returns their works."""
    return list(dist.batch_isend_irecv(
        [dist.P2POp(dist.isend if s else dist.irecv, t, peer, group=group) for s, t, peer in ops]))


def _drain(buf: torch.Tensor, nbytes: int, dst: int, src: int, group: dist.ProcessGroup | None,
           sent: list[Any], what: str) -> None:
    """Receive the `nbytes` the peer announced into scratch (and send `buf` unless `sent` already did)."""
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=buf.device)
    ops = [(False, scratch, src)] if sent else [(True, buf, dst), (False, scratch, src)]
    _wait(sent + issue(what, lambda: _post(ops, group)), what)


def _wait(works: list[Any], what: str) -> None:
    try:
        wait_works(works, what=what)
    except RuntimeError as exc:
        if isinstance(exc, CommError):
            raise
        raise wrap_error(exc, what) from exc
