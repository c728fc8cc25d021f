"""Payload transport over any torch.distributed process group.

Only `payload.buffer` crosses the wire; a received buffer is wrapped with the local
`payload.meta` (or a `meta` the caller passes), which is valid because every rank encodes
a tensor of the same shape with the same codec, so the receiver's own context decodes
the sender's buffer.

- `allreduce_payload`: sums buffers in place (legal for additive codecs only; packed
  byte buffers are refused).
- `allgather_payloads`: every rank's payload, in group-rank order, of equal
  (`same_size=True`) or differing sizes.
- `send_recv`: send to `dst` while receiving from `src` (a ring step).
- `decode_sum`: decode gathered payloads and sum them in rank order.

Algorithms (``algo=``; `ccomm.schedule` describes exactly what each sends):

- ``"ring"``: the backend's own collective (`ring`).
- ``"doubling"``, ``"bruck"`` (all-gather) and ``"doubling"``, ``"tree"`` (all-reduce):
  ceil(log2 n)-depth rounds over point-to-point messages (`loggather`, `logreduce`,
  `p2p`), for high-latency links where a ring's n-1 sequential latencies dominate.
- ``"auto"`` (default): the cheaper by the alpha-beta model, from the group's measured
  or the configured latency and bandwidth (`auto`: `AutoConfig`, `configure`,
  `set_measured`).

Every function has an `async_op=True` form returning a `CommHandle`. Every byte a rank
hands to torch.distributed is recorded in `ccomm.stats`, with the algorithm. Failures of
the backend (including a peer that died or stopped answering within the group's timeout)
surface as `CommError`, or `CommTimeoutError` when the backend reports a timeout.
Buffers and headers stay on the payload's device, so the same code runs on gloo (CPU)
and NCCL (CUDA).
"""
from __future__ import annotations

from ._handle import CommError, CommHandle, CommTimeoutError
from .api import allgather_payloads, allreduce_payload
from .auto import AutoConfig, auto_config, clear_measured, configure, link_for, set_measured
from .decode import decode_sum
from .sendrecv import send_recv

__all__ = [
    "CommError",
    "CommTimeoutError",
    "CommHandle",
    "allreduce_payload",
    "allgather_payloads",
    "send_recv",
    "decode_sum",
    "AutoConfig",
    "auto_config",
    "configure",
    "clear_measured",
    "link_for",
    "set_measured",
]
