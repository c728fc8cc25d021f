"""Piecewise-constant bandwidth traces (constant, steps, random walk, CSV, Mahimahi).

A :class:`Trace` gives a payload rate in Mbit/s on each interval ``[t_k, t_{k+1})``. Without
looping the last rate holds forever; with ``loop=True`` the pattern repeats every ``period_s``.
Zero-rate intervals are legal outages. All integrals are exact: a cumulative-bits table built
once at construction turns ``bits_between`` and ``time_to_send`` into bisections.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

__all__ = ["Trace", "MAHIMAHI_PACKET_BITS", "MAHIMAHI_MAX_MS"]


#: Mahimahi delivers one 1500-byte packet per line: 12,000 bits.
MAHIMAHI_PACKET_BITS = 1500 * 8
#: Longest Mahimahi period read (int32 milliseconds, ~24.9 days); a larger last timestamp is
#: almost surely a corrupt file.
MAHIMAHI_MAX_MS = 2**31 - 1
_MBIT = 1e6
# Floating slack when mapping a delivery instant back to an integer millisecond.
_MS_EPS = 1e-6
# Relative slack for "the target lies exactly on a breakpoint" in time_to_send.
_REL_EPS = 1e-12
# Trace.min unrolls looping traces to a common period at most this many times the longest one.
_MAX_LCM_FACTOR = 1000
# ... and to at most this many breakpoints in total.
_MAX_MIN_POINTS = 2_000_000
_LOOP_RE = re.compile(r"^loop\s+period_s\s*=\s*(\S+)$")


def _default_where(k: int) -> str:
    return f"point {k}"


def _validate(
    times: Sequence[float],
    rates: Sequence[float],
    loop: bool,
    period_s: float | None,
    where: Callable[[int], str] = _default_where,
) -> None:
    """Raise ``ValueError`` for any rule of docs/design/netsim.md#trace-validation; ``where(k)`` names
    point k (e.g. ``file:line``)."""
    if len(times) == 0:
        raise ValueError(f"{where(-1)}: empty trace (need at least one (time_s, mbps) point)")
    if len(times) != len(rates):
        raise ValueError(f"{where(-1)}: times_s and mbps differ in length ({len(times)} vs {len(rates)})")
    for k, (t, r) in enumerate(zip(times, rates)):
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"{where(k)}: time_s={t!r} must be finite and >= 0")
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"{where(k)}: mbps={r!r} must be finite and >= 0")
        if k == 0 and t != 0:
            raise ValueError(f"{where(k)}: first time_s={t!r} must be 0")
        if k > 0 and t <= times[k - 1]:
            raise ValueError(f"{where(k)}: time_s={t!r} must increase (previous {times[k - 1]!r})")
    last = len(times) - 1
    if loop:
        if period_s is None:
            raise ValueError(f"{where(last)}: period_s is required when loop=True")
        if not math.isfinite(period_s) or period_s <= times[-1]:
            raise ValueError(
                f"{where(last)}: period_s={period_s!r} must be finite and after the last time {times[-1]!r}"
            )
        if all(r == 0 for r in rates):
            raise ValueError(f"{where(last)}: zero total capacity (every rate is 0 over the period)")
    else:
        if period_s is not None:
            raise ValueError(f"{where(last)}: period_s={period_s!r} is only allowed with loop=True")
        if all(r == 0 for r in rates):
            raise ValueError(f"{where(last)}: zero total capacity (every rate is 0)")
        if rates[-1] == 0:
            raise ValueError(
                f"{where(last)}: a non-looping trace must not end at rate 0 (the last rate holds forever)"
            )


@dataclass(frozen=True, repr=False)
class Trace:
    """Payload rate in Mbit/s, piecewise constant on ``[times_s[k], times_s[k+1])``."""

    times_s: tuple[float, ...]
    mbps: tuple[float, ...]
    loop: bool = False
    period_s: float | None = None
    _cum: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        times_s: Iterable[float],
        mbps: Iterable[float],
        *,
        loop: bool = False,
        period_s: float | None = None,
        _where: Callable[[int], str] = _default_where,
    ) -> None:
        times = tuple(float(t) for t in times_s)
        rates = tuple(float(r) for r in mbps)
        period = None if period_s is None else float(period_s)
        _validate(times, rates, loop, period, _where)
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "mbps", rates)
        object.__setattr__(self, "loop", bool(loop))
        object.__setattr__(self, "period_s", period)
        # cum[k] = bits delivered in [0, t_k); for looping traces one extra entry at the period.
        ends = times[1:] + ((period,) if loop and period is not None else ())
        cum = [0.0]
        for k, end in enumerate(ends):
            cum.append(cum[-1] + rates[k] * _MBIT * (end - times[k]))
        object.__setattr__(self, "_cum", tuple(cum))

    def __repr__(self) -> str:
        # Mahimahi-derived traces hold tens of thousands of points; keep logs readable.
        loop = f", loop=True, period_s={self.period_s!r}" if self.loop else ""
        if len(self.times_s) <= 6:
            return f"Trace(times_s={self.times_s!r}, mbps={self.mbps!r}{loop})"
        return (f"Trace(<{len(self.times_s)} points to t={self.times_s[-1]:g} s, "
                f"{min(self.mbps):g}..{max(self.mbps):g} Mbit/s>{loop})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def constant(cls, mbps: float) -> Trace:
        if not (math.isfinite(mbps) and mbps > 0):
            raise ValueError(f"mbps={mbps!r} must be finite and > 0 for a constant trace")
        return cls((0.0,), (mbps,))

    @classmethod
    def steps(
        cls, points: Iterable[tuple[float, float]], *, loop: bool = False, period_s: float | None = None
    ) -> Trace:
        """``steps([(0, 100), (30, 10)])``: 100 Mbit/s until t = 30 s, then 10."""
        pts = list(points)
        return cls([p[0] for p in pts], [p[1] for p in pts], loop=loop, period_s=period_s)

    @classmethod
    def random_walk(
        cls,
        start: float,
        low: float,
        high: float,
        step_s: float,
        duration_s: float,
        sigma: float = 0.1,
        seed: int = 0,
    ) -> Trace:
        """Bounded walk of the log-rate: each ``step_s`` adds a uniform step in ``[-sigma, sigma]``.

        Steps come only from ``random.Random(seed).random()``, whose output is stable across
        Python versions (unlike ``uniform``/``gauss`` helpers that changed over time). Moves past
        a bound reflect back inside ``[low, high]``.
        """
        if not (math.isfinite(low) and low > 0):
            raise ValueError(f"low={low!r} must be finite and > 0")
        if not (math.isfinite(high) and high >= low):
            raise ValueError(f"high={high!r} must be finite and >= low={low!r}")
        if not (low <= start <= high):
            raise ValueError(f"start={start!r} must lie in [low, high] = [{low}, {high}]")
        if not (math.isfinite(step_s) and step_s > 0):
            raise ValueError(f"step_s={step_s!r} must be finite and > 0")
        if not (math.isfinite(duration_s) and duration_s >= step_s):
            raise ValueError(f"duration_s={duration_s!r} must be finite and >= step_s={step_s!r}")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma={sigma!r} must be finite and >= 0")
        rng = random.Random(seed)
        lo, hi = math.log(low), math.log(high)
        x = math.log(start)
        nsteps = int(math.floor(duration_s / step_s + 1e-9))
        times, rates = [], []
        for k in range(nsteps):
            times.append(k * step_s)
            # The first point is `start` itself (exp(log(x)) may differ in the last bit).
            rates.append(start if k == 0 else min(max(math.exp(x), low), high))
            x += sigma * (2.0 * rng.random() - 1.0)
            # Reflect (possibly several times for a tiny band) back into [lo, hi].
            while x < lo or x > hi:
                x = 2 * lo - x if x < lo else 2 * hi - x
        return cls(times, rates)

    @classmethod
    def from_csv(cls, path: str | Path, *, loop: bool | None = None, period_s: float | None = None) -> Trace:
        """Read ``time_s,mbps`` rows; ``#`` starts a comment, blank lines are skipped.

        A ``# loop period_s=P`` comment (written by :meth:`to_csv`) makes the trace loop unless
        ``loop``/``period_s`` are given explicitly.
        """
        path = Path(path)
        declared: float | None = None
        times: list[float] = []
        rates: list[float] = []
        lines: list[int] = []
        header_seen = False
        last_line = 0
        with path.open() as fh:
            for lineno, raw in enumerate(fh, start=1):
                last_line = lineno
                text, _, comment = raw.partition("#")
                text = text.strip()
                m = _LOOP_RE.match(comment.strip())
                if m:
                    try:
                        declared = float(m.group(1))
                    except ValueError:
                        raise ValueError(f"{path}:{lineno}: unparsable period in {comment.strip()!r}") from None
                if not text:
                    continue
                cells = [c.strip() for c in text.split(",")]
                if not header_seen:
                    if cells != ["time_s", "mbps"]:
                        raise ValueError(f"{path}:{lineno}: expected header 'time_s,mbps', got {text!r}")
                    header_seen = True
                    continue
                if len(cells) != 2:
                    raise ValueError(f"{path}:{lineno}: expected 2 columns 'time_s,mbps', got {text!r}")
                try:
                    t, r = float(cells[0]), float(cells[1])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: unparsable numbers in {text!r}") from None
                times.append(t)
                rates.append(r)
                lines.append(lineno)
        if not header_seen:
            raise ValueError(f"{path}:{last_line}: empty trace (no 'time_s,mbps' header)")

        def where(k: int) -> str:
            return f"{path}:{lines[k] if 0 <= k < len(lines) else last_line}"

        if loop is None:
            loop = declared is not None
        if loop and period_s is None:
            period_s = declared
        return cls(times, rates, loop=loop, period_s=period_s, _where=where)

    @classmethod
    def from_mahimahi(cls, path: str | Path, bin_ms: int = 1, loop: bool = True) -> Trace:
        """Read a Mahimahi delivery trace: one line per 1500-byte opportunity at integer ms t.

        An opportunity at t counts toward ``(t-1, t]`` ms, so bin b covers
        ``(b*bin_ms, (b+1)*bin_ms]`` and runs at ``12*count/bin_ms`` Mbit/s (a lone ``1`` is
        12 Mbit/s). Mahimahi loops its file with the last timestamp as period.
        """
        path = Path(path)
        if not (isinstance(bin_ms, int) and bin_ms >= 1):
            raise ValueError(f"bin_ms={bin_ms!r} must be an integer >= 1")
        stamps: list[int] = []
        lines: list[int] = []
        last_line = 0
        with path.open() as fh:
            for lineno, raw in enumerate(fh, start=1):
                last_line = lineno
                text = raw.strip()
                if not text or text.startswith("#"):
                    continue
                try:
                    ms = int(text)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: expected an integer ms timestamp, got {text!r}") from None
                if ms < 0:
                    raise ValueError(f"{path}:{lineno}: timestamp {ms} must be >= 0")
                if stamps and ms < stamps[-1]:
                    raise ValueError(f"{path}:{lineno}: timestamp {ms} decreases (previous {stamps[-1]})")
                stamps.append(ms)
                lines.append(lineno)
        if not stamps:
            raise ValueError(f"{path}:{last_line}: empty trace (no timestamps)")
        end_ms = stamps[-1]
        if end_ms == 0:
            raise ValueError(f"{path}:{lines[-1]}: the last timestamp (the period) must be > 0 ms")
        if end_ms > MAHIMAHI_MAX_MS:
            raise ValueError(f"{path}:{lines[-1]}: timestamp {end_ms} ms is beyond the longest trace netsim reads "
                             f"({MAHIMAHI_MAX_MS} ms, about {MAHIMAHI_MAX_MS / 86_400_000:.1f} days)")
        # Only bins holding a timestamp are visited (a run of empty bins is one zero-rate
        # segment), so time and memory follow the file's length, not its last timestamp.
        counts = Counter(max(0, -(-ms // bin_ms) - 1) for ms in stamps)  # (b*bin, (b+1)*bin] -> b
        times: list[float] = []
        rates: list[float] = []

        def add(b: int, rate: float) -> None:
            if rates and rates[-1] == rate:
                return  # merge equal neighbours; the integral is unchanged
            times.append(b * bin_ms / 1000.0)
            rates.append(rate)

        prev = -1
        for b in sorted(counts):
            if b > prev + 1:
                add(prev + 1, 0.0)
            width_ms = min(bin_ms, end_ms - b * bin_ms)  # the last bin may be cut by the period
            add(b, MAHIMAHI_PACKET_BITS * counts[b] / (width_ms * 1e-3) / _MBIT)
            prev = b
        where = lambda k: f"{path}:{lines[-1]}"  # noqa: E731 - whole-file rules point at the end
        if loop:
            return cls(times, rates, loop=True, period_s=end_ms / 1000.0, _where=where)
        return cls(times, rates, _where=where)

    @classmethod
    def load(cls, path: str | Path, *, bin_ms: int = 1, loop: bool | None = None) -> Trace:
        """Read ``.csv`` as CSV and anything else as Mahimahi."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            return cls.from_csv(path, loop=loop)
        return cls.from_mahimahi(path, bin_ms=bin_ms, loop=True if loop is None else loop)

    # ------------------------------------------------------------------ writers
    def to_csv(self, path: str | Path) -> None:
        """Write ``time_s,mbps`` with ``repr`` floats, so reading it back is exact."""
        lines = ["time_s,mbps"]
        if self.loop:
            lines.insert(0, f"# loop period_s={self.period_s!r}")
        lines += [f"{t!r},{r!r}" for t, r in zip(self.times_s, self.mbps)]
        Path(path).write_text("\n".join(lines) + "\n")

    def mahimahi_lines(self, duration_s: float | None = None) -> list[int]:
        """Delivery timestamps (ms): one per 12,000 cumulative bits, so the integral stays
        within one packet (plus 1 ms of rounding).

        Looping traces cover one period and must end on it, because Mahimahi takes the last
        line as its period: when the last packet would come earlier (a trailing outage, or
        leftover bits under one packet), it moves to the period end, so from its natural time
        until the period ends the file may lag by a second packet. Bits under one packet per
        period are dropped, which is negligible unless the trace is very slow."""
        if self.loop:
            assert self.period_s is not None
            end = self.period_s
        elif duration_s is None or not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"duration_s={duration_s!r}: a non-looping trace needs a finite duration > 0")
        else:
            end = float(duration_s)
        npackets = int(math.floor(self.bits_between(0.0, end) / MAHIMAHI_PACKET_BITS + 1e-9))
        if npackets == 0:
            raise ValueError(f"trace carries under one 1500-byte packet in {end} s; Mahimahi cannot represent it")
        out: list[int] = []
        for k in range(1, npackets + 1):
            tau = self.time_to_send(k * MAHIMAHI_PACKET_BITS, 0.0)
            out.append(max(1, math.ceil(tau * 1000.0 - _MS_EPS)))
        if self.loop:
            # Mahimahi's period is the last line; move the final packet there if an outage ends the period.
            out[-1] = max(out[-1], round(end * 1000.0))
        return out

    def to_mahimahi(self, path: str | Path, duration_s: float | None = None) -> None:
        Path(path).write_text("".join(f"{ms}\n" for ms in self.mahimahi_lines(duration_s)))

    def save(self, path: str | Path, *, duration_s: float | None = None) -> None:
        """Write ``.csv`` as CSV, anything else as Mahimahi."""
        if Path(path).suffix.lower() == ".csv":
            self.to_csv(path)
        else:
            self.to_mahimahi(path, duration_s)

    # ------------------------------------------------------------------ queries
    @property
    def end_s(self) -> float:
        """Period for looping traces, else the last breakpoint."""
        return self.period_s if self.loop and self.period_s is not None else self.times_s[-1]

    def rate_mbps(self, t: float) -> float:
        if t < 0:
            raise ValueError(f"t={t!r} must be >= 0")
        if self.loop:
            assert self.period_s is not None
            t = math.fmod(t, self.period_s)
        return self.mbps[bisect.bisect_right(self.times_s, t) - 1]

    def _bits_to(self, t: float) -> float:
        """Bits delivered in [0, t)."""
        if self.loop:
            assert self.period_s is not None
            q, rem = divmod(t, self.period_s)
            return q * self._cum[-1] + self._bits_in_first(rem)
        return self._bits_in_first(t)

    def _bits_in_first(self, t: float) -> float:
        k = bisect.bisect_right(self.times_s, t) - 1
        return self._cum[k] + self.mbps[k] * _MBIT * (t - self.times_s[k])

    def bits_between(self, t0: float, t1: float) -> float:
        if not (0 <= t0 <= t1) or not math.isfinite(t1):
            raise ValueError(f"need 0 <= t0 <= t1 < inf, got t0={t0!r}, t1={t1!r}")
        return max(0.0, self._bits_to(t1) - self._bits_to(t0))

    def time_to_send(self, bits: float, start_s: float = 0.0) -> float:
        """Least d >= 0 with ``bits_between(start_s, start_s + d) == bits`` (outages pause)."""
        if not (math.isfinite(bits) and bits >= 0):
            raise ValueError(f"bits={bits!r} must be finite and >= 0")
        if not (math.isfinite(start_s) and start_s >= 0):
            raise ValueError(f"start_s={start_s!r} must be finite and >= 0")
        if bits == 0:
            return 0.0
        if len(self.times_s) == 1 and not self.loop:
            return bits / (self.mbps[0] * _MBIT)  # constant fast path
        target = self._bits_to(start_s) + bits
        if self.loop:
            assert self.period_s is not None
            q, rem = divmod(target, self._cum[-1])
            if rem <= _REL_EPS * self._cum[-1] and q > 0:
                # A target on a period boundary (up to rounding) ends in the previous period's
                # last busy segment, not after a trailing outage.
                q, rem = q - 1, rem + self._cum[-1]
            end = q * self.period_s + self._invert_first(rem)
        else:
            end = self._invert_first(target)
        return max(0.0, end - start_s)

    def _invert_first(self, bits: float) -> float:
        """Least t in the first period (or beyond, for a non-looping tail) with bits_to(t) >= bits."""
        # Rounding must not push a target that ends exactly where an outage begins past the outage.
        j = bisect.bisect_left(self._cum, bits - _REL_EPS * bits)
        k = max(0, min(j - 1, len(self.times_s) - 1))
        # Segments with rate 0 have equal cum at both ends, so bisect_left skips them: r_k > 0.
        return self.times_s[k] + (bits - self._cum[k]) / (self.mbps[k] * _MBIT)

    def outages(self) -> list[tuple[float, float]]:
        """Zero-rate intervals ``(start, end)`` within one period (looping) or the breakpoints."""
        ends = self.times_s[1:] + ((self.end_s,) if self.loop else ())
        out: list[tuple[float, float]] = []
        for k, end in enumerate(ends):
            if self.mbps[k] == 0:
                if out and out[-1][1] == self.times_s[k]:
                    out[-1] = (out[-1][0], end)
                else:
                    out.append((self.times_s[k], end))
        return out

    def max_outage_s(self) -> float:
        """Longest outage, joining one that ends a period to one that starts it when looping."""
        outs = self.outages()
        if not outs:
            return 0.0
        longest = max(e - s for s, e in outs)
        if self.loop and outs[0][0] == 0.0 and outs[-1][1] == self.end_s and len(outs) > 1:
            longest = max(longest, outs[0][1] + (outs[-1][1] - outs[-1][0]))
        return longest

    def mean_mbps(self) -> float:
        """Mean over one period (looping) or over the breakpoints (the last rate if constant)."""
        if self.end_s == 0:
            return self.mbps[0]
        return self._bits_to(self.end_s) / self.end_s / _MBIT

    # ------------------------------------------------------------------ operations
    def _rebuild(self, rates: Sequence[float]) -> Trace:
        return Trace(self.times_s, rates, loop=self.loop, period_s=self.period_s)

    def scale(self, factor: float) -> Trace:
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor={factor!r} must be finite and > 0")
        return self._rebuild([r * factor for r in self.mbps])

    def clip(self, low: float = 0.0, high: float = math.inf) -> Trace:
        if not (low >= 0 and high > 0 and high >= low) or math.isnan(low) or math.isnan(high):
            raise ValueError(f"clip bounds need 0 <= low <= high and high > 0, got low={low!r}, high={high!r}")
        return self._rebuild([min(max(r, low), high) for r in self.mbps])

    @staticmethod
    def min(*traces: Trace) -> Trace:
        """Pointwise minimum (a flow crossing several links gets the slowest rate).

        Non-looping traces merge breakpoints. Looping traces need commensurate periods (the
        result loops on their common multiple). A constant combines with anything. A looping
        trace and a time-varying non-looping one cannot be represented and raise ``ValueError``.
        """
        if len(traces) == 1 and isinstance(traces[0], (list, tuple)):
            traces = tuple(traces[0])  # accept Trace.min([a, b]) as well
        if not traces:
            raise ValueError("Trace.min needs at least one trace")
        uniq = list(dict.fromkeys(traces))
        if len(uniq) == 1:
            return uniq[0]
        consts = [t for t in uniq if len(t.times_s) == 1 and not t.loop]
        rest = [t for t in uniq if t not in consts]
        cap = min((t.mbps[0] for t in consts), default=math.inf)
        if not rest:
            return Trace.constant(cap)
        looping = [t for t in rest if t.loop]
        if looping and len(looping) != len(rest):
            raise ValueError("Trace.min: cannot combine a looping trace with a time-varying non-looping one")
        if looping:
            period = _common_period([t.end_s for t in looping])
            reps = [round(period / t.end_s) for t in looping]
            total = sum(r * len(t.times_s) for t, r in zip(looping, reps))
            if total > _MAX_MIN_POINTS:
                raise ValueError(
                    f"Trace.min: the common period {period} s would unroll to {total} points "
                    f"(limit {_MAX_MIN_POINTS}); resample() the traces to a coarser step first"
                )
            unrolled = [_unroll(t, r) for t, r in zip(looping, reps)]
        else:
            period = None
            unrolled = [(t.times_s, t.mbps) for t in rest]
        times = sorted(set().union(*(set(ts) for ts, _ in unrolled)))
        rates = []
        for t in times:
            r = cap
            for ts, ms in unrolled:
                r = min(r, ms[bisect.bisect_right(ts, t) - 1])
            rates.append(r)
        return Trace(times, rates, loop=bool(looping), period_s=period)

    def resample(self, step_s: float) -> Trace:
        """Mean rate per ``step_s`` bin; the integral at every bin edge is unchanged."""
        if not (math.isfinite(step_s) and step_s > 0):
            raise ValueError(f"step_s={step_s!r} must be finite and > 0")
        end = self.end_s
        nbins = max(1, math.ceil(end / step_s - 1e-9))
        times, rates = [], []
        for b in range(nbins):
            t0 = b * step_s
            t1 = min((b + 1) * step_s, end) if self.loop else (b + 1) * step_s
            rate = self.bits_between(t0, t1) / (t1 - t0) / _MBIT
            if rates and rates[-1] == rate:
                continue
            times.append(t0)
            rates.append(rate)
        if not self.loop and rates[-1] != self.mbps[-1]:
            # Past the last bin the original's final rate holds; keep it explicitly.
            times.append(nbins * step_s)
            rates.append(self.mbps[-1])
        return Trace(times, rates, loop=self.loop, period_s=self.period_s)


def _common_period(periods: Sequence[float]) -> float:
    fracs = [Fraction(p).limit_denominator(10**6) for p in periods]
    lcm = fracs[0]
    for f in fracs[1:]:
        num = lcm.numerator * f.numerator // math.gcd(lcm.numerator, f.numerator)
        den = math.gcd(lcm.denominator, f.denominator)
        lcm = Fraction(num, den)
    if lcm > _MAX_LCM_FACTOR * max(fracs):
        raise ValueError(f"Trace.min: looping periods {list(periods)} have no common period within {_MAX_LCM_FACTOR}x")
    return float(lcm)


def _unroll(trace: Trace, reps: int) -> tuple[list[float], list[float]]:
    times: list[float] = []
    rates: list[float] = []
    for q in range(reps):
        times += [q * trace.end_s + t for t in trace.times_s]
        rates += list(trace.mbps)
    return times, rates
