"""How the ranks of ``netsim.emulate`` agree on t0, the origin of emulation time.

Processes of one boot share CLOCK_MONOTONIC (network namespaces included), so rank 0's reading
after a barrier is everyone's t0. Across hosts, each rank estimates its offset to rank 0 from
the fastest of a few ping-pongs on the gloo side group (the midpoint of the round trip).
"""
from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ._clock import EmuVirtualClock, EmuWallClock

__all__ = ["SYNC_ROUNDS", "boot_id", "agree_clock", "clock_offset"]

logger = logging.getLogger(__name__)

#: Ping-pongs per rank when the ranks' monotonic clocks differ (ranks on several hosts).
SYNC_ROUNDS = 8


def boot_id() -> str:
    """This boot's identity: equal ids mean one CLOCK_MONOTONIC."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def agree_clock(
    side: dist.ProcessGroup, rank: int, n: int, root: int, kind: str, orig: dict[str, Callable[..., Any]]
) -> EmuWallClock | EmuVirtualClock:
    """Collective over ``side``: the clock every rank measures emulation time with.

    ``root`` is group rank 0's global rank; ``orig`` the unpatched torch.distributed functions.
    """
    ident = f"{socket.gethostname()}/{boot_id()}"
    idents: list[Any] = [None] * n
    dist.all_gather_object(idents, ident, group=side)
    orig["barrier"](group=side)
    if kind == "virtual":
        return EmuVirtualClock()
    t = torch.tensor([time.monotonic()], dtype=torch.float64)
    orig["broadcast"](t, src=root, group=side)
    t0 = float(t.item())
    if len(set(idents)) > 1:
        offset = clock_offset(side, rank, n, orig)
        logger.debug("emulate: rank %d clock offset to rank 0: %.3f ms", rank, offset * 1e3)
        t0 -= offset
    return EmuWallClock(t0)


def clock_offset(side: dist.ProcessGroup, rank: int, n: int, orig: dict[str, Callable[..., Any]]) -> float:
    """This rank's monotonic time minus rank 0's, from the min-RTT of SYNC_ROUNDS ping-pongs."""
    send, recv = orig["send"], orig["recv"]
    buf = torch.zeros(1, dtype=torch.float64)
    best_rtt, offset = math.inf, 0.0
    for r in range(1, n):
        for _ in range(SYNC_ROUNDS):
            if rank == 0:
                recv(buf, group=side, group_src=r)
                buf.fill_(time.monotonic())
                send(buf, group=side, group_dst=r)
            elif rank == r:
                a = time.monotonic()
                send(buf, group=side, group_dst=0)
                recv(buf, group=side, group_src=0)
                c = time.monotonic()
                if c - a < best_rtt:
                    best_rtt, offset = c - a, (a + c) / 2 - float(buf.item())
    return offset
