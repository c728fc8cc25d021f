"""`allreduce_payload` and `allgather_payloads`: check, choose the algorithm, run it."""
from __future__ import annotations


import torch.distributed as dist

from ..payload import Payload
from ..stats import CommStats, resolve
from ..validate import check_bool
from ._handle import PACKED_DTYPES, CommHandle, check_payload, finish_sync, group_rank_and_size
from .auto import resolve_algo
from .loggather import log_allgather
from .logreduce import log_allreduce
from .ring import ring_allgather, ring_allreduce
from .header_exchange import exchange_headers
from .wire import check_gathered

__all__ = ["allreduce_payload", "allgather_payloads"]


def allreduce_payload(
    payload: Payload,
    group: dist.ProcessGroup | None = None,
    *,
    algo: str = "auto",
    check: bool = True,
    async_op: bool = False,
    key: str | None = None,
    stats: CommStats | None = None,
) -> "Payload | CommHandle[Payload]":
    """Sum `payload.buffer` over the group, in place; returns `payload` (or a handle).

    Legal only for additive codecs (`codec.additive`), whose buffers are numbers; the
    result decodes to the sum of every rank's decoded tensor. ``algo``: ``"ring"`` (the
    backend's all-reduce), ``"doubling"`` or ``"tree"`` (log-depth, any group size), or
    ``"auto"`` (chosen by the cost model, `ccomm.comm.auto`). Counts `payload.nbytes`.
    ``check=True`` first exchanges every rank's wire header (blocking, one gather of
    `ccomm.header.HEADER_BYTES` per rank, log-depth unless ``algo="ring"``): ranks that
    disagree on codec, dtype, shape or size all raise `HeaderMismatchError` naming both
    sides, before the backend sees the buffers. ``check=False`` skips it for callers that
    verified their layout otherwise; a mismatch is then a backend error (gloo may abort).
    """
    payload = check_payload(payload, "allreduce_payload")
    buf = payload.buffer
    if buf.dtype in PACKED_DTYPES:
        raise ValueError(
            f"allreduce_payload: payload buffer has dtype {buf.dtype} (packed codes), whose sum is "
            "meaningless; use allgather_payloads for non-additive codecs"
        )
    check_bool("allreduce_payload.check", check)
    rank, world = group_rank_and_size(group)
    chosen = resolve_algo("allreduce", algo, group, world, payload.nbytes)
    what = f"allreduce_payload(key={key!r}, {payload.nbytes} bytes, algo={chosen!r})"
    st = resolve(stats)
    if check and world > 1:
        heads = exchange_headers(payload, group, rank, world, chosen, what, st, "allreduce", key)
        check_gathered(payload, heads, rank, what, key, same_size=True)
    if chosen == "ring":
        handle = ring_allreduce(payload, group, what, st, key)
    else:
        handle = log_allreduce(payload, group, rank, world, chosen, what, st, key)
    return finish_sync(handle, async_op)


def allgather_payloads(
    payload: Payload,
    group: dist.ProcessGroup | None = None,
    *,
    same_size: bool = False,
    algo: str = "auto",
    check: bool = True,
    async_op: bool = False,
    key: str | None = None,
    stats: CommStats | None = None,
) -> "list[Payload] | CommHandle[list[Payload]]":
    """Every rank's payload in group-rank order, each wrapped with the local `payload.meta`.

    `same_size=True` promises that every rank's buffer has the same number of elements
    (true for `codec.fixed_size` codecs on equal shapes) and skips learning the sizes;
    breaking the promise is a backend error. All ranks must use the same buffer dtype.
    ``algo``: ``"ring"`` (the backend's all-gather; unknown sizes are gathered first and
    buffers padded to the largest), ``"doubling"`` (power-of-two groups) or ``"bruck"``
    (log-depth; unknown sizes travel in each round's headers), or ``"auto"`` (chosen by
    the cost model, `ccomm.comm.auto`). Headers and padding are counted in `ccomm.stats`.

    Wire headers (`ccomm.header`) take the place of the sizes: every rank checks every
    other rank's codec, dtype, shape (and, with ``same_size=True``, byte length) and a
    mismatch raises the same `HeaderMismatchError` on every rank, naming both sides, before
    any buffer reaches the backend. ``check=True`` (default) does so with ``same_size=True``
    too, which then costs what ``same_size=False`` costs (the sizes' step, without the
    padding); ``check=False`` with ``same_size=True`` sends no header, for callers that
    verified their layout otherwise (a broken promise is then a backend error; gloo aborts).
    """
    payload = check_payload(payload, "allgather_payloads")
    if not isinstance(same_size, bool):
        raise ValueError(f"allgather_payloads: same_size={same_size!r} must be a bool")
    check_bool("allgather_payloads.check", check)
    rank, world = group_rank_and_size(group)
    sizes_known = same_size and not check
    chosen = resolve_algo("allgather", algo, group, world, payload.nbytes, sizes_known=sizes_known)
    what = f"allgather_payloads(key={key!r}, {payload.nbytes} bytes, algo={chosen!r})"
    st = resolve(stats)
    if chosen == "ring":
        handle = ring_allgather(payload, group, world, same_size, check, what, st, key)
    else:
        handle = log_allgather(payload, group, rank, world, chosen, same_size, check, what, st, key)
    return finish_sync(handle, async_op)


