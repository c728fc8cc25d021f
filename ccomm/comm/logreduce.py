"""Log-depth all-reduce of additive payloads (``"doubling"``, ``"tree"``), any n.

The rounds come from `ccomm.schedule.allreduce_rounds`; this module only executes them.
Every message carries the whole buffer.

1. For each round this rank takes part in, post its sends of the buffer and receives
   into temporaries together, and wait for all of them (the buffer must not change
   while it is being sent).
2. Apply what came in: ``"add"`` rounds add the received buffers in the round's order
   (tree: left child, then right), ``"copy"`` rounds overwrite the buffer.

Every rank ends with the same bits: the tree reduces to rank 0 and broadcasts its
result; in recursive doubling both partners compute the same sum (IEEE addition is
commutative), and ranks beyond the largest power of two get the result copied.
The sums are in another order than the backend ring's, so rounding may differ from it.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..payload import Payload
from ..schedule import allreduce_rounds
from ..stats import CommStats
from ._handle import CommHandle
from .p2p import post, submit, wait_all

__all__ = ["log_allreduce"]

logger = logging.getLogger(__name__)


def log_allreduce(
    payload: Payload,
    group: dist.ProcessGroup | None,
    rank: int,
    world: int,
    algo: str,
    what: str,
    st: CommStats,
    key: str | None,
) -> CommHandle[Payload]:
    """Sum ``payload.buffer`` over the group in place by ``algo``; runs on the group's thread."""
    buf = payload.buffer
    rounds = allreduce_rounds(algo, world) if buf.numel() > 0 else []
    st.record("allreduce", key, payload_bytes=payload.nbytes, algo=algo)
    logger.debug("%s", what)

    def job() -> Payload:
        for step, (action, rnd) in enumerate(rounds):
            dsts = [t.dst for t in rnd if t.src == rank]
            srcs = [t.src for t in rnd if t.dst == rank]
            if not dsts and not srcs:
                continue
            tmp = [torch.empty_like(buf) for _ in srcs]
            ops = [(True, buf, d) for d in dsts] + [(False, t, s) for t, s in zip(tmp, srcs)]
            wait_all(post(ops, group, step, rank), f"{what} round {step}")
            for t in tmp:
                if action == "add":
                    buf.add_(t)
                else:
                    buf.copy_(t)
        return payload

    work = submit(group, job)
    return CommHandle([work], lambda: work.wait(), what)
