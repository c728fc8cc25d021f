"""Log-depth all-gather of payloads (``"doubling"``, ``"bruck"``): ceil(log2 n) rounds.

Who sends which blocks to whom in each round comes from `ccomm.schedule.allgather_rounds`;
this module only executes it. No round copies blocks: each lands directly where it is returned.

1. Own block: a copy of ``payload.buffer`` (the ring returns copies too).
2. Every round, for each transfer this rank sends: its blocks; for each it receives:
   buffers for the blocks it names.
3. Sizes known and unchecked (``same_size=True, check=False``): one buffer of n blocks,
   block b at position `_slot` (b for doubling, b - rank mod n for Bruck), where every
   transfer's blocks are adjacent; each transfer is one message, a view of that buffer, and
   the results are views too. Sends and receives of the round are posted together and waited on.
4. Otherwise each block is its own tensor and message, and each transfer leads with the wire headers (`ccomm.header`) of its blocks,
   one per block, forwarded with the block from its origin; a block's receive buffer is
   sized from its header, so unequal sizes never reach the backend as a mismatch.
   On CPU (gloo) header and blocks are sent together with the header receive; once the
   header is in, the block receives are posted, so a round costs one latency. Elsewhere
   (NCCL, whose grouped sends would wait for receives posted only after the group) the
   headers are a step of their own. Empty blocks are not sent.
5. Every rank waits for all of a round's messages before the next round, whose
   messages may forward what it just received.
6. After the last round every rank holds every block's header and checks them against
   its own (`check_peers`): a disagreement raises the same `HeaderMismatchError` on every
   rank, since every rank completed the rounds and sees the same headers.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from ..header import HEADER_BYTES, HEADER_WORDS, HeaderMismatchError, WireHeader
from ..payload import Payload
from ..schedule import Transfer, allgather_rounds
from ..stats import CommStats
from ._handle import CommHandle
from .p2p import post, submit, wait_all
from .wire import check_gathered, header_of

__all__ = ["log_allgather"]

logger = logging.getLogger(__name__)


def _slot(algo: str, rank: int, world: int, block: int) -> int:
    """Position of `block` in this rank's buffer: a transfer's blocks are adjacent there."""
    return block if algo == "doubling" else (block - rank) % world


def _same_size(
    buf: torch.Tensor, rounds: list[list[Transfer]], group: dist.ProcessGroup | None, rank: int, world: int,
    algo: str, what: str,
) -> list[torch.Tensor]:
    """Step 3 of the module docstring: one buffer, one message per transfer, views out."""
    m = buf.numel()
    out = buf.new_empty(world * m)

    def view(blocks: tuple[int, ...]) -> torch.Tensor:
        first = _slot(algo, rank, world, blocks[0])
        # The plans keep a transfer's blocks adjacent in this layout (ccomm.schedule).
        assert [_slot(algo, rank, world, b) for b in blocks] == list(range(first, first + len(blocks)))
        return out[first * m:(first + len(blocks)) * m]

    view((rank,)).copy_(buf)
    if m > 0:
        for k, rnd in enumerate(rounds):
            ops = [(True, view(t.blocks), t.dst) for t in rnd if t.src == rank]
            ops += [(False, view(t.blocks), t.src) for t in rnd if t.dst == rank]
            wait_all(post(ops, group, k, rank), f"{what} round {k}")
    return [view((b,)) for b in range(world)]


def log_allgather(
    payload: Payload,
    group: dist.ProcessGroup | None,
    rank: int,
    world: int,
    algo: str,
    same_size: bool,
    check: bool,
    what: str,
    st: CommStats,
    key: str | None,
) -> CommHandle[list[Payload]]:
    """Every rank's payload by ``algo`` (see the module docstring); runs on the group's thread."""
    buf = payload.buffer
    rounds = allgather_rounds(algo, world)
    pipelined = buf.device.type == "cpu"
    st.record("allgather", key, payload_bytes=payload.nbytes, algo=algo)
    logger.debug("%s", what)

    sized = not same_size or check

    def job() -> list[torch.Tensor]:
        if not sized:
            return _same_size(buf, rounds, group, rank, world, algo, what)
        blocks: list[torch.Tensor | None] = [None] * world
        blocks[rank] = buf.clone()
        heads: list[torch.Tensor | None] = [None] * world  # packed wire header of every block
        heads[rank] = header_of(payload).pack(buf.device)
        step = 0
        for k, rnd in enumerate(rounds):
            sends = [t for t in rnd if t.src == rank]
            recvs = [t for t in rnd if t.dst == rank]
            where = f"{what} round {k}"
            data_out = [(True, blocks[b], t.dst) for t in sends for b in t.blocks]
            heads_out = [torch.cat([heads[b] for b in t.blocks]) for t in sends]  # type: ignore[misc]
            heads_in = [torch.empty(HEADER_WORDS * len(t.blocks), dtype=torch.int64, device=buf.device) for t in recvs]
            st.record("allgather", key, header_bytes=HEADER_BYTES * sum(len(t.blocks) for t in sends), calls=0,
                      algo=algo)
            h_out = [(True, h, t.dst) for h, t in zip(heads_out, sends)]
            h_in = [(False, h, t.src) for h, t in zip(heads_in, recvs)]
            nonempty = [op for op in data_out if op[1].numel() > 0]
            if pipelined:
                sent = post(h_out + nonempty, group, step, rank)
                wait_all(post(h_in, group, step, rank), where + " [sizes]")
            else:
                wait_all(post(h_out + h_in, group, step, rank), where + " [sizes]")
                step += 1
                sent = post(nonempty, group, step, rank)
            data_in = []
            for h, t in zip(heads_in, recvs):
                for i, b in enumerate(t.blocks):
                    heads[b] = h[i * HEADER_WORDS:(i + 1) * HEADER_WORDS]
                    blocks[b] = _block_for(WireHeader.unpack(heads[b], source=f"{where}: rank {t.src}"), buf.device)
                    if blocks[b].numel() > 0:
                        data_in.append((False, blocks[b], t.src))
            got = post(data_in, group, step, rank)
            wait_all(sent + got, where)
            step += 1
        if sized:
            check_gathered(payload, heads, rank, what, key, same_size)  # type: ignore[arg-type]
        return blocks  # type: ignore[return-value]

    work = submit(group, job)

    def finish() -> list[Payload]:
        out: Any = work.wait()
        return [payload.with_buffer(b) for b in out]

    return CommHandle([work], finish, what)


def _block_for(h: WireHeader, device: torch.device) -> torch.Tensor:
    """The receive buffer a header announces: its own dtype and byte length, so a block of
    another dtype or size is still received whole (and refused by the final check)."""
    esize = torch.empty((), dtype=h.buffer_dtype).element_size()
    if h.nbytes % esize:
        raise HeaderMismatchError(f"a header announces {h.nbytes} bytes of {h.buffer_dtype}, not whole elements")
    return torch.empty(h.nbytes // esize, dtype=h.buffer_dtype, device=device)
