"""The reservation rule shared by the simulator, emulate and the wire.

Each resource (an uplink, a downlink, or a mesh pair) is a token bucket refilled at B(t) with
depth 0: a message gets only bandwidth not yet promised to earlier messages. For a message
i -> j of S bytes ready at t::

    start = max(t, free[r] for r in res);  rate = Trace.min(traces of res)
    fin   = start + serialization(S, rate, start);  free[r] = fin for r in res
    arr   = max(fin + delay_sample(uniform(seed, i, j, seq), packets(S)), last_arr[i, j])

Service is first come first served in the order ``reserve`` is called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .link import uniform
from .topo import Resource, Topo

__all__ = ["Reservation", "Reserver"]


@dataclass(frozen=True)
class Reservation:
    src: int
    dst: int
    seq: int
    nbytes: int
    ready_s: float
    start_s: float
    fin_s: float
    arr_s: float


class Reserver:
    """Mutable link state (free times, FIFO arrivals, per-pair sequence numbers) for one topology."""

    def __init__(self, topo: Topo, seed: int = 0) -> None:
        self.topo = topo
        self.seed = int(seed)
        self.free: dict[Resource, float] = {}
        self.last_arr: dict[tuple[int, int], float] = {}
        self.next_seq: dict[tuple[int, int], int] = {}
        self.busy_s: dict[Resource, float] = {}

    def take_seq(self, src: int, dst: int) -> int:
        seq = self.next_seq.get((src, dst), 0)
        self.next_seq[(src, dst)] = seq + 1
        return seq

    def occupy(self, resources: Iterable[Resource], src: int, dst: int, nbytes: float, ready_s: float) -> tuple[float, float]:
        """Reserve ``resources`` for one message; returns ``(start, fin)``.

        ``resources`` may be a subset of ``topo.resources(src, dst)`` when the owners of the
        other resources reserve them separately (emulate's sender and receiver)."""
        if not (math.isfinite(ready_s) and ready_s >= 0):
            raise ValueError(f"ready_s={ready_s!r} must be finite and >= 0")
        res = tuple(resources)
        start = max([ready_s] + [self.free.get(r, 0.0) for r in res])
        fin = start + self.topo.serialization_time(src, dst, nbytes, start)
        for r in res:
            self.free[r] = fin
            self.busy_s[r] = self.busy_s.get(r, 0.0) + (fin - start)
        return start, fin

    def arrival(self, src: int, dst: int, seq: int, nbytes: float, fin_s: float, start_s: float | None = None) -> float:
        """Arrival of the last byte: the jittered delay after ``fin_s``, kept FIFO per direction."""
        link = self.topo.pair_link(src, dst)
        u = uniform(self.seed, src, dst, seq)
        delay = link.delay_sample(u, link.packets(nbytes), at_s=fin_s if start_s is None else start_s)
        # TCP delivers in order, so the model stays FIFO even where the OS wire may reorder.
        arr = max(fin_s + delay, self.last_arr.get((src, dst), 0.0))
        self.last_arr[(src, dst)] = arr
        return arr

    def reserve(self, src: int, dst: int, nbytes: float, ready_s: float, seq: int | None = None) -> Reservation:
        """Apply the whole rule for one message i -> j."""
        if seq is None:
            seq = self.take_seq(src, dst)
        start, fin = self.occupy(self.topo.resources(src, dst), src, dst, nbytes, ready_s)
        arr = self.arrival(src, dst, seq, nbytes, fin, start)
        return Reservation(src, dst, seq, int(nbytes), ready_s, start, fin, arr)

    def state(self) -> dict[str, Any]:
        """A plain snapshot (for logging, or for replicas that must agree)."""
        return {
            "free": dict(self.free),
            "last_arr": dict(self.last_arr),
            "next_seq": dict(self.next_seq),
        }
