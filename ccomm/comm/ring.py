"""The ``"ring"`` algorithm: the backend's own all-reduce and all-gather collectives.

- `ring_allreduce`: ``dist.all_reduce`` of the buffer, in place.
- `ring_allgather`: ``dist.all_gather``. With unknown sizes (or ``check=True``), every
  rank's wire header (`ccomm.header`: codec, dtype, shape, bytes) is gathered first
  (blocking, since the receive buffers depend on it) and checked on every rank, then
  buffers padded to the largest size are gathered and trimmed; header and padding are
  counted in `ccomm.stats`. That header exchange costs a second ring of latencies, which
  the log-depth algorithms avoid (`ccomm.schedule`).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..payload import Payload
from ..stats import CommStats
from ._handle import CommHandle, issue
from .header_exchange import exchange_headers
from .wire import check_gathered

__all__ = ["ring_allreduce", "ring_allgather"]

logger = logging.getLogger(__name__)


def ring_allreduce(
    payload: Payload, group: dist.ProcessGroup | None, what: str, st: CommStats, key: str | None
) -> CommHandle[Payload]:
    """Sum ``payload.buffer`` over the group in place with the backend's all-reduce."""
    buf = payload.buffer
    st.record("allreduce", key, payload_bytes=payload.nbytes, algo="ring")
    logger.debug("%s", what)
    work = issue(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=True))
    return CommHandle([work], lambda: payload, what)


def ring_allgather(
    payload: Payload,
    group: dist.ProcessGroup | None,
    world: int,
    same_size: bool,
    check: bool,
    what: str,
    st: CommStats,
    key: str | None,
) -> CommHandle[list[Payload]]:
    """Every rank's payload with the backend's all-gather (see the module docstring)."""
    buf = payload.buffer
    if same_size and not check:
        st.record("allgather", key, payload_bytes=payload.nbytes, algo="ring")
        logger.debug("%s", what)
        out = [torch.empty_like(buf) for _ in range(world)]
        work = issue(what, lambda: dist.all_gather(out, buf, group=group, async_op=True))
        return CommHandle([work], lambda: [payload.with_buffer(b) for b in out], what)

    # Header exchange: blocking, since the receive buffers depend on it. Counted when handed
    # over, so a failed exchange still shows its header bytes.
    n = buf.numel()
    st.record("allgather", key, calls=1, algo="ring")
    rank = dist.get_rank(group)
    heads = exchange_headers(payload, group, rank, world, "ring", what, st, "allgather", key)
    # Equal dtypes are checked here, so byte lengths convert to element counts exactly.
    sizes = [h.nbytes // buf.element_size() for h in check_gathered(payload, heads, rank, what, key, same_size)]
    longest = max(sizes)
    pad = longest - n
    st.record("allgather", key, payload_bytes=payload.nbytes, padding_bytes=pad * buf.element_size(), calls=0,
              algo="ring")
    logger.debug("%s sizes=%s", what, sizes)
    send = buf if pad == 0 else torch.cat([buf, buf.new_zeros(pad)])
    out = [buf.new_empty(longest) for _ in range(world)]
    work = issue(what, lambda: dist.all_gather(out, send, group=group, async_op=True))

    def finish() -> list[Payload]:
        # A leading slice of a 1-D tensor is contiguous, so no copy is needed.
        return [payload.with_buffer(b if s == longest else b[:s]) for b, s in zip(out, sizes)]

    return CommHandle([work], finish, what)
