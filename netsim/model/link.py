"""One network link: bandwidth (constant or a trace), one-way latency, jitter, loss, queue.

Units follow the netsim conventions: Mbit/s (10^6 bit/s) of payload, latency and jitter in ms
in the constructor and seconds everywhere else, sizes in bytes, loss as a fraction.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import KW_ONLY, dataclass, field
from numbers import Real

from .trace import Trace

__all__ = ["Link", "uniform", "HEADER_BYTES", "ETHERNET_BYTES"]

logger = logging.getLogger(__name__)

#: IPv4 (20) + TCP with timestamps (32) per segment: MSS = mtu - 52.
HEADER_BYTES = 52
#: Ethernet header bytes that htb counts on a veth but not on a TUN.
ETHERNET_BYTES = 14
# Default queue: at least this many packets (netem's own default limit).
_MIN_QUEUE_PACKETS = 1000
# ... and 1.5 bandwidth-delay products, so the queue never limits a window-sized burst.
_QUEUE_BDP_FACTOR = 1.5
_MTU_RANGE = (576, 65535)


def _is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def uniform(seed: int, src: int, dst: int, seq: int, stream: int = 0) -> float:
    """A value in [0, 1) fixed by (seed, src, dst, seq, stream).

    Every backend draws the same value for the same message whatever the thread or process
    order, because it is a hash rather than a position in a random stream.
    """
    key = f"{int(seed)}:{int(src)}:{int(dst)}:{int(seq)}:{int(stream)}".encode()
    word = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return (word >> 11) / float(1 << 53)  # 53 bits: every value is an exact double below 1


@dataclass(frozen=True)
class Link:
    """A one-way link model; the same object describes both directions of a symmetric link."""

    bandwidth_mbps: float | None
    latency_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0
    trace: Trace | None = None
    _: KW_ONLY
    queue_packets: int | None = None
    reorder: bool = False
    mtu: int = 1500
    _raw: Trace = field(init=False, repr=False, compare=False)
    _effective: Trace = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.trace is None:
            b = self.bandwidth_mbps
            if b is None or not _is_number(b) or not (math.isfinite(b) and b > 0):
                raise ValueError(f"bandwidth_mbps={b!r} must be finite and > 0 (or None with a trace)")
        else:
            if not isinstance(self.trace, Trace):
                raise ValueError(f"trace={self.trace!r} must be a netsim.Trace or None")
            if self.bandwidth_mbps is not None:
                raise ValueError("bandwidth_mbps must be None when a trace is given (not both)")
        lat = self.latency_ms
        if not _is_number(lat) or not (math.isfinite(lat) and lat >= 0):
            raise ValueError(f"latency_ms={lat!r} must be finite and >= 0")
        jit = self.jitter_ms
        if not _is_number(jit) or not (0 <= jit <= lat):
            raise ValueError(f"jitter_ms={jit!r} must be in [0, latency_ms={lat}]")
        if not _is_number(self.loss) or not (0 <= self.loss < 1):
            raise ValueError(f"loss={self.loss!r} must be in [0, 1)")
        if self.loss > 0 and lat == 0:
            raise ValueError("loss > 0 needs latency_ms > 0 (the Mathis rate cap divides by the RTT)")
        lo, hi = _MTU_RANGE
        if not isinstance(self.mtu, int) or isinstance(self.mtu, bool) or not (lo <= self.mtu <= hi):
            raise ValueError(f"mtu={self.mtu!r} must be an integer in [{lo}, {hi}]")
        q = self.queue_packets
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q < 1):
            raise ValueError(f"queue_packets={q!r} must be an integer >= 1 or None")
        if not isinstance(self.reorder, bool):
            raise ValueError(f"reorder={self.reorder!r} must be a bool")
        raw = self.trace if self.trace is not None else Trace.constant(float(self.bandwidth_mbps))  # type: ignore[arg-type]
        object.__setattr__(self, "_raw", raw)
        cap = self.mathis_mbps
        object.__setattr__(self, "_effective", raw if cap is None or cap >= max(raw.mbps) else raw.clip(high=cap))
        if q is not None and q * self.mtu < self.bdp_bytes:
            logger.warning(
                "queue_packets=%d (%d bytes) is below the bandwidth-delay product (%.0f bytes): "
                "the queue, not the link, will limit throughput",
                q, q * self.mtu, self.bdp_bytes,
            )

    # ------------------------------------------------------------------ derived values
    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000.0

    @property
    def jitter_s(self) -> float:
        return self.jitter_ms / 1000.0

    @property
    def rtt_s(self) -> float:
        return 2.0 * self.latency_s

    @property
    def mss(self) -> int:
        return self.mtu - HEADER_BYTES

    @property
    def rate_trace(self) -> Trace:
        """The configured rate (a constant trace when given ``bandwidth_mbps``), no loss cap."""
        return self._raw

    @property
    def effective_trace(self) -> Trace:
        """The rate the model uses: the configured one capped by Mathis under loss."""
        return self._effective

    @property
    def mathis_mbps(self) -> float | None:
        """Mathis' TCP throughput bound ``8*MSS*sqrt(3/(2p))/RTT`` in Mbit/s, None without loss."""
        if self.loss == 0:
            return None
        return 8.0 * self.mss * math.sqrt(3.0 / (2.0 * self.loss)) / self.rtt_s / 1e6

    @property
    def peak_mbps(self) -> float:
        return max(self.rate_trace.mbps)

    @property
    def bdp_bytes(self) -> float:
        return self.peak_mbps * 1e6 * self.rtt_s / 8.0

    @property
    def queue_limit(self) -> int:
        """``queue_packets`` or the default ``max(1000, ceil(1.5 * BDP / mtu))``."""
        if self.queue_packets is not None:
            return self.queue_packets
        return max(_MIN_QUEUE_PACKETS, math.ceil(_QUEUE_BDP_FACTOR * self.bdp_bytes / self.mtu))

    # ------------------------------------------------------------------ model
    def rate_bps(self, t: float) -> float:
        return self._effective.rate_mbps(t) * 1e6

    def bits_between(self, t0: float, t1: float) -> float:
        return self._effective.bits_between(t0, t1)

    def serialization_time(self, nbytes: float, start_s: float = 0.0) -> float:
        """Least d with ``bits_between(start_s, start_s + d) == 8 * nbytes``."""
        if not (_is_number(nbytes) and math.isfinite(nbytes) and nbytes >= 0):
            raise ValueError(f"nbytes={nbytes!r} must be finite and >= 0")
        return self._effective.time_to_send(8.0 * nbytes, start_s)

    def transfer_time(self, nbytes: float, start_s: float = 0.0) -> float:
        """Jitter-free time from ``start_s`` until the last byte arrives (latency + serialization)."""
        return self.latency_s + self.serialization_time(nbytes, start_s)

    def packets(self, nbytes: float) -> int:
        """Segments a message of ``nbytes`` needs (at least one)."""
        return max(1, math.ceil(nbytes / self.mss))

    def delay_sample(self, u: float, npackets: int, at_s: float | None = None) -> float:
        """One-way delay of the last of ``npackets`` FIFO packets: ``L + J*(2*u**(1/m) - 1)``.

        Packets spaced ``delta = 8*mtu/B`` apart draw independent delays in L +- J; only
        ``m = min(npackets, floor(2J/delta) + 1)`` of them fit in one jitter window, and the
        last arrival is the maximum of m uniforms, whose inverse CDF is ``u**(1/m)``. B is the
        rate at ``at_s``, or the peak rate when not given.
        """
        if not (0 <= u < 1):
            raise ValueError(f"u={u!r} must be in [0, 1)")
        if not (isinstance(npackets, int) and npackets >= 1):
            raise ValueError(f"npackets={npackets!r} must be an integer >= 1")
        if self.jitter_ms == 0:
            return self.latency_s
        rate = self.rate_bps(at_s) if at_s is not None else self.peak_mbps * 1e6
        window = 1 if rate == 0 else int(math.floor(2 * self.jitter_s / (8.0 * self.mtu / rate))) + 1
        m = max(1, min(npackets, window))
        return self.latency_s + self.jitter_s * (2.0 * u ** (1.0 / m) - 1.0)

    def wire_factor(self, l2: bool = True) -> float:
        """Line rate / goodput: ``(mtu+14)/(mtu-52)`` on a veth (l2), ``mtu/(mtu-52)`` on a TUN."""
        return (self.mtu + (ETHERNET_BYTES if l2 else 0)) / self.mss

    def line_rate_mbps(self, t: float = 0.0, l2: bool = True) -> float:
        """Rate an OS shaper must be set to at time t so that goodput equals the model rate."""
        return self.rate_trace.rate_mbps(t) * self.wire_factor(l2)
