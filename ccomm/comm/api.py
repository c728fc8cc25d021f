"""`allreduce_payload` and `allgather_payloads`: check, choose the algorithm, run it."""
from __future__ import annotations

import logging

import torch.distributed as dist

from ..payload import Payload
from ..stats import CommStats, resolve
from ._handle import PACKED_DTYPES, CommHandle, check_payload, finish_sync, group_rank_and_size
from .auto import resolve_algo
from .loggather import log_allgather
from .logreduce import log_allreduce
from .ring import ring_allgather, ring_allreduce

__all__ = ["allreduce_payload", "allgather_payloads"]

logger = logging.getLogger(__name__)


def allreduce_payload(
    payload: Payload,
    group: dist.ProcessGroup | None = None,
    *,
    algo: str = "auto",
    async_op: bool = False,
    key: str | None = None,
    stats: CommStats | None = None,
) -> "Payload | CommHandle[Payload]":
    """Sum `payload.buffer` over the group, in place; returns `payload` (or a handle).

    Legal only for additive codecs (`codec.additive`), whose buffers are numbers; the
    result decodes to the sum of every rank's decoded tensor. ``algo``: ``"ring"`` (the
    backend's all-reduce), ``"doubling"`` or ``"tree"`` (log-depth, any group size), or
    ``"auto"`` (chosen by the cost model, `ccomm.comm.auto`). Counts `payload.nbytes`.
    """
    payload = check_payload(payload, "allreduce_payload")
    buf = payload.buffer
    if buf.dtype in PACKED_DTYPES:
        raise ValueError(
            f"allreduce_payload: payload buffer has dtype {buf.dtype} (packed codes), whose sum is "
            "meaningless; use allgather_payloads for non-additive codecs"
        )
    rank, world = group_rank_and_size(group)
    chosen = resolve_algo("allreduce", algo, group, world, payload.nbytes)
    what = f"allreduce_payload(key={key!r}, {payload.nbytes} bytes, algo={chosen!r})"
    st = resolve(stats)
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
    """
    payload = check_payload(payload, "allgather_payloads")
    if not isinstance(same_size, bool):
        raise ValueError(f"allgather_payloads: same_size={same_size!r} must be a bool")
    rank, world = group_rank_and_size(group)
    chosen = resolve_algo("allgather", algo, group, world, payload.nbytes, sizes_known=same_size)
    what = f"allgather_payloads(key={key!r}, {payload.nbytes} bytes, algo={chosen!r})"
    st = resolve(stats)
    if chosen == "ring":
        handle = ring_allgather(payload, group, world, same_size, what, st, key)
    else:
        handle = log_allgather(payload, group, rank, world, chosen, same_size, what, st, key)
    return finish_sync(handle, async_op)
