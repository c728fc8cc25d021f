"""Packet scheduling of the userspace delay wire, free of I/O and clocks (docs/design/netsim.md#delay-wire).

:class:`WireCore` decides, for each IPv4 packet read from host ``i``'s TUN at time ``now``,
whether it is dropped and otherwise to which host and when it is delivered.  The daemon in
:mod:`netsim.namespaces.wire` feeds it real packets on CLOCK_MONOTONIC; the tests feed it a fake clock.

Per packet ``i -> j`` (seq counted per ordered pair):

* loss when ``uniform(seed, i, j, seq, 1) < loss`` (the same draw on every backend);
* drop-tail when the bytes in flight on channel (i, j) would exceed its limit;
* reservation rule over the channel's wire-shaped resources (token buckets of depth
  ``burst_s``, 0 in the first plan): ``start = max(now - burst_s, free[r])``,
  ``fin = max(now, when the slowest of them has carried the packet)``;
* ``arr = max(fin + L + J(2u - 1), last_arr[i, j])``: FIFO per direction unless ``reorder``;
* pure ACKs (``<= SMALL_PACKET_BYTES``) on a wire-shaped channel skip its backlog and the FIFO
  (their bytes still count), as htb with TCP small queues effectively lets them do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from netsim.model.link import uniform

__all__ = ["SMALL_PACKET_BYTES", "Channel", "Delivery", "WireCore", "Finish", "constant_finish"]

#: Packets this small (IPv4 + TCP with options, no payload: pure ACKs) skip shaper backlogs.
SMALL_PACKET_BYTES = 80

#: ``finish(start_s, bits) -> fin_s``: when a resource free from ``start_s`` has carried ``bits``.
Finish = Callable[[float, float], float]


def constant_finish(rate_bps: float) -> Finish:
    """A constant-rate resource."""
    if not (rate_bps > 0 and math.isfinite(rate_bps)):
        raise ValueError(f"rate_bps must be positive and finite, got {rate_bps!r}")
    return lambda start, bits: start + bits / rate_bps


@dataclass(frozen=True)
class Channel:
    """One ordered pair's impairments and the wire-shaped resources its packets cross."""

    latency_s: float
    jitter_s: float = 0.0
    loss: float = 0.0
    resources: tuple[str, ...] = ()
    queue_bytes: int = 4 << 20
    reorder: bool = False

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"latency_s must be >= 0 and finite, got {self.latency_s!r}")
        if not (0 <= self.jitter_s <= self.latency_s):
            raise ValueError(f"jitter_s must be in [0, latency_s], got {self.jitter_s!r}")
        if not (0 <= self.loss < 1):
            raise ValueError(f"loss must be in [0, 1), got {self.loss!r}")
        if self.queue_bytes < 1500:
            raise ValueError(f"queue_bytes must be >= 1500, got {self.queue_bytes!r}")


@dataclass(frozen=True)
class Delivery:
    """A scheduled packet: write it to host ``dst``'s TUN at ``due`` (absolute seconds)."""

    src: int
    dst: int
    seq: int
    due: float
    nbytes: int


@dataclass
class WireCore:
    """Routing and due times for ``len(addrs)`` hosts; ``addrs[i]`` is host i's IPv4 (4 bytes)."""

    addrs: Sequence[bytes]
    channels: Mapping[tuple[int, int], Channel]
    resources: Mapping[str, Finish] = field(default_factory=dict)
    seed: int = 0
    burst_s: float = 0.0
    drops: dict[str, int] = field(default_factory=dict)
    _index: dict[bytes, int] = field(init=False, repr=False)
    _seq: dict[tuple[int, int], int] = field(init=False, repr=False)
    _last: dict[tuple[int, int], float] = field(init=False, repr=False)
    _free: dict[str, float] = field(init=False, repr=False)
    _inflight: dict[tuple[int, int], int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (0 <= self.burst_s <= 0.1):
            raise ValueError(f"burst_s must be in [0, 0.1], got {self.burst_s!r}")
        if any(len(a) != 4 for a in self.addrs):
            raise ValueError("addrs must be 4-byte IPv4 addresses")
        self._index = {bytes(a): i for i, a in enumerate(self.addrs)}
        if len(self._index) != len(self.addrs):
            raise ValueError("addrs must be distinct")
        for (i, j), ch in self.channels.items():
            missing = [r for r in ch.resources if r not in self.resources]
            if missing:
                raise ValueError(f"channel ({i}, {j}) uses unknown resources {missing}")
        self._seq, self._last, self._inflight = {}, {}, {}
        self._free = {r: -math.inf for r in self.resources}
        self.drops = {"non_ipv4": 0, "unknown_dst": 0, "loss": 0, "queue": 0}

    def _drop(self, why: str) -> None:
        self.drops[why] += 1

    def admit(self, src: int, pkt: bytes, now: float) -> Delivery | None:
        """Schedule a packet read from host ``src`` at ``now``; ``None`` when it is dropped."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            self._drop("non_ipv4")
            return None
        dst = self._index.get(bytes(pkt[16:20]))
        ch = self.channels.get((src, dst)) if dst is not None else None
        if ch is None:
            self._drop("unknown_dst")
            return None
        key = (src, dst)
        seq = self._seq.get(key, 0)
        self._seq[key] = seq + 1
        if ch.loss > 0 and uniform(self.seed, src, dst, seq, 1) < ch.loss:
            self._drop("loss")
            return None
        size = len(pkt)
        if self._inflight.get(key, 0) + size > ch.queue_bytes:
            self._drop("queue")
            return None
        fin = now
        if ch.resources and size <= SMALL_PACKET_BYTES:
            # Pure ACKs skip the shaper's backlog (their bytes still delay later packets).  In
            # the kernel, TCP small queues keep htb's backlog short, so ACKs never wait long;
            # the wire frees packets at once, so without this a duplex flow's ACKs sat behind
            # the whole reverse backlog (measured: mesh duplex 9.4 of 10 Mbit/s).
            for r in ch.resources:
                base = max(self._free[r], now - self.burst_s)
                self._free[r] = self.resources[r](base, 8.0 * size)
            arr = now + self._delay(ch, src, dst, seq)
            self._inflight[key] = self._inflight.get(key, 0) + size
            return Delivery(src, dst, seq, arr, size)
        if ch.resources:
            # A token bucket of depth burst_s: the resource's own timeline (free) may run up
            # to burst_s behind the clock, so a packet the loop read late does not push every
            # later packet back for good; the packet itself never leaves before it was read.
            start = max([now - self.burst_s] + [self._free[r] for r in ch.resources])
            vfin = max(self.resources[r](start, 8.0 * size) for r in ch.resources)
            for r in ch.resources:
                self._free[r] = vfin
            fin = max(now, vfin)
        arr = fin + self._delay(ch, src, dst, seq)
        if not ch.reorder:
            arr = max(arr, self._last.get(key, -math.inf))
            self._last[key] = arr
        self._inflight[key] = self._inflight.get(key, 0) + size
        return Delivery(src, dst, seq, arr, size)

    def _delay(self, ch: Channel, src: int, dst: int, seq: int) -> float:
        """One-way delay L + J(2u - 1), u the shared draw of (seed, src, dst, seq)."""
        if ch.jitter_s == 0:
            return ch.latency_s
        return ch.latency_s + ch.jitter_s * (2.0 * uniform(self.seed, src, dst, seq) - 1.0)

    def delivered(self, d: Delivery) -> None:
        """Release ``d``'s bytes from its channel's queue once written."""
        key = (d.src, d.dst)
        self._inflight[key] = self._inflight.get(key, 0) - d.nbytes

    def inflight(self, src: int, dst: int) -> int:
        return self._inflight.get((src, dst), 0)
