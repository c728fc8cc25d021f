"""The userspace delay wire daemon: ``python -m netsim.namespaces.wire --state FILE``
(docs/design/netsim.md#delay-wire).

Kernels without netem (this project's machines) get delay, jitter, loss, outages and wire-side
shaping from this process.  It opens one TUN ``nsmt0`` per host namespace, reads every IPv4
packet the hosts send, lets :class:`netsim.namespaces.wire_core.WireCore` decide the due time and writes
the packet into the destination's TUN then.  It also replays bandwidth traces as
``tc class change`` lines fed to one persistent ``tc -n NS -batch -`` per namespace.

Design choice: one thread and one epoll loop rather than a reader thread per TUN and a writer
per destination.  Under the GIL extra threads only add hand-offs; a timerfd (ns resolution,
unlike epoll's millisecond timeout) wakes the loop for the next due packet or trace step, and
``bias`` (the median overshoot of that wake-up, measured at start) is subtracted.

Protocol with the controller: after creating the TUNs the daemon prints ``TUNS`` and waits for
a line on stdin (the controller configures addresses and htb meanwhile); then it fixes t0 =
CLOCK_MONOTONIC, prints ``T0 <t0>`` and runs until SIGTERM/SIGINT.  The TUNs are not
persistent, so they disappear with the process.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import logging
import os
import select
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from netsim.namespaces.commands import htb_change_line
from netsim.namespaces.wire_core import Channel, Delivery, Finish, WireCore, constant_finish

__all__ = ["Timer", "open_tun", "main", "run", "trace_finish", "trace_steps"]

log = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_PR_SET_PDEATHSIG = 1
_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_LATE_WARN_S = 1e-3
_MAX_BIAS_S = 1e-3
_BIAS_STEP_S = 2e-6
_RT_PRIORITY = 10
_MAX_BATCH = 64
_LATE_WINDOW = 8192
#: Stall intervals kept for ``late_intervals`` (the most recent ones).
_STALL_WINDOW = 4096
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def open_tun(ns: str, name: str = "nsmt0", nspath: str | None = None) -> int:
    """Open TUN ``name`` inside namespace ``ns`` (via setns and back) and return its fd.

    ``nspath`` overrides ``/run/netns/<ns>`` (Mininet hosts: ``/proc/<pid>/ns/net``).
    """
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(nspath or f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _check(_libc.setns(target, _CLONE_NEWNET), f"setns({ns})")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            ifr = struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
        finally:
            _check(_libc.setns(own, _CLONE_NEWNET), "setns(back)")
    finally:
        os.close(own)
        os.close(target)
    return fd


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Timer:
    """A CLOCK_MONOTONIC timerfd armed at absolute times (Python 3.11 lacks os.timerfd_*)."""

    def __init__(self) -> None:
        self.fd = _libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            _check(-1, "timerfd_create")

    def arm(self, at: float) -> None:
        at = max(at, 1e-9)  # zero would disarm
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(int(at), int((at % 1) * 1e9)))
        _check(_libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None),
               "timerfd_settime")

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


def calibrate(timer: Timer, samples: int = 200, step_s: float = 1e-3) -> float:
    """Median overshoot of ``samples`` timer wake-ups ``step_s`` ahead (subtracted later)."""
    ep = select.epoll()
    ep.register(timer.fd, select.EPOLLIN)
    over = []
    for _ in range(samples):
        target = time.monotonic() + step_s
        timer.arm(target)
        ep.poll()
        over.append(time.monotonic() - target)
        timer.clear()
    ep.close()
    return max(0.0, statistics.median(over))


def trace_finish(spec: dict[str, Any], factor: float, t0: float) -> Finish:
    """Finish function of a trace-driven resource: line rate = trace rate * ``factor``."""
    from netsim.model.trace import Trace

    trace = Trace(spec["times"], spec["mbps"], loop=spec.get("loop", False),
                  period_s=spec.get("period_s"))

    def finish(start: float, bits: float) -> float:
        rel = start - t0
        return t0 + rel + trace.time_to_send(bits / factor, max(0.0, rel))

    return finish


def trace_steps(times: list[float], mbps: list[float], period_s: float | None) -> Iterator[
        tuple[float, float]]:
    """(t, mbps) of every step, repeating every ``period_s`` when the trace loops."""
    base = 0.0
    while True:
        for t, r in zip(times, mbps):
            yield base + t, r
        if not period_s:
            return
        base += period_s


def _resources(spec: dict[str, Any], t0: float) -> dict[str, Finish]:
    out: dict[str, Finish] = {}
    for name, r in spec.items():
        if "rate_bps" in r:
            out[name] = constant_finish(float(r["rate_bps"]))
        else:
            out[name] = trace_finish(r["trace"], float(r["factor"]), t0)
    return out


class _Replay:
    """Feeds ``class change`` lines to a persistent ``tc -n NS -batch -`` at t0 + t_k."""

    def __init__(self, spec: dict[str, Any], t0: float) -> None:
        self.spec = spec
        argv = spec.get("argv") or ["tc", "-n", spec["ns"], "-batch", "-"]
        self.proc = subprocess.Popen(argv,
                                     stdin=subprocess.PIPE, text=True)
        self.steps = trace_steps(spec["times"], spec["mbps"], spec.get("period_s"))
        self.t0 = t0
        self.next: tuple[float, float] | None = next(self.steps, None)
        self.last_line = ""

    def due(self) -> float | None:
        return None if self.next is None else self.t0 + self.next[0]

    def fire(self) -> None:
        assert self.next is not None and self.proc.stdin is not None
        line = htb_change_line(self.spec["dev"], self.next[1] * 1e6 * self.spec["factor"],
                               self.spec["mtu"], self.spec["l2"])
        if line != self.last_line:  # resampling can repeat a rate; tc need not hear it twice
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            self.last_line = line
        self.next = next(self.steps, None)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Stopped(Exception):
    """Raised by the signal handler to leave the event loop at once."""


class _Loop:
    def __init__(self, state: dict[str, Any]) -> None:
        w = state["wire"]
        self.hosts = state["hosts"]
        self.tun = bool(w.get("tun"))
        self.counters_path = w.get("counters")
        self.fds: list[int] = []
        self.stop = False
        self.w = w
        self.heap: list[tuple[float, int, Delivery, bytes]] = []
        self.n = 0
        self.late: deque[float] = deque(maxlen=_LATE_WINDOW)
        self.n_late = 0
        self.late_max = 0.0
        #: Merged [due, delivered] intervals of packets over 1 ms late: when the wire, not the
        #: link, set the pace.  Their union over a window bounds what the stalls cost it.
        self.stalls: deque[list[float]] = deque(maxlen=_STALL_WINDOW)
        self.sent = 0
        self.bias = 0.0

    def open(self) -> None:
        if self.tun:
            self.fds = [open_tun(h["ns"], self.w.get("dev", "nsmt0"), h.get("nspath"))
                        for h in self.hosts]

    def start(self, t0: float) -> None:
        w = self.w
        chans = {(c["src"], c["dst"]): Channel(c["latency_s"], c.get("jitter_s", 0.0),
                                               c.get("loss", 0.0), tuple(c.get("resources", ())),
                                               int(c.get("queue_bytes", 4 << 20)),
                                               bool(c.get("reorder", False)))
                 for c in w.get("channels", [])}
        addrs = [bytes(int(x) for x in h["addr"].split(".")) for h in self.hosts]
        self.core = WireCore(addrs, chans, _resources(w.get("resources", {}), t0),
                             seed=int(w.get("seed", 0)), burst_s=float(w.get("burst_s", 0.0)))
        self.replays = [_Replay(c, t0) for c in w.get("changes", [])]

    def write_counters(self) -> None:
        if not self.counters_path:
            return
        # Percentiles of the recent window only: sorting every sample ever taken once a
        # second stalled the loop itself (tens of ms at 200k samples).  "bottleneck" uses the
        # whole run: more than 1 % of all packets over 1 ms late, i.e. p99 > 1 ms.
        lat = sorted(self.late)
        p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0)
        frac = self.n_late / self.sent if self.sent else 0.0
        data = {"sent": self.sent, "drops": self.core.drops, "late_p50_s": p(0.5),
                "late_p99_s": p(0.99), "late_max_s": self.late_max,
                "late_over_1ms_fraction": frac, "bottleneck": frac > 0.01,
                "late_intervals": list(self.stalls)}
        tmp = self.counters_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.counters_path)

    def run(self, timer: Timer, bias: float) -> None:
        self.bias = bias
        ep = select.epoll()
        for i, fd in enumerate(self.fds):
            ep.register(fd, select.EPOLLIN)
        ep.register(timer.fd, select.EPOLLIN)
        by_fd = {fd: i for i, fd in enumerate(self.fds)}
        next_counters = time.monotonic() + 1.0
        while not self.stop:
            wake = [next_counters]
            if self.heap:
                wake.append(self.heap[0][0] - self.bias)
            wake += [d for d in (r.due() for r in self.replays) if d is not None]
            timer.arm(min(wake))
            try:
                events = ep.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == timer.fd:
                    timer.clear()
                    continue
                self._drain(fd, by_fd[fd])
            now = time.monotonic()
            self._deliver(now + self.bias)
            for r in self.replays:
                while r.due() is not None and r.due() <= now + self.bias:  # type: ignore[operator]
                    r.fire()
            if now >= next_counters:
                self.write_counters()
                next_counters = now + 1.0
        ep.close()

    def _drain(self, fd: int, src: int) -> None:
        # Bounded, so a flood on one TUN cannot starve deliveries (epoll reports it again).
        for _ in range(_MAX_BATCH):
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:  # the device went away under us: count it, keep the wire up
                self.core.drops["read_error"] = self.core.drops.get("read_error", 0) + 1
                log.debug("read from host %d failed: %s", src, e)
                return
            d = self.core.admit(src, pkt, time.monotonic())
            if d is not None:
                self.n += 1
                heapq.heappush(self.heap, (d.due, self.n, d, pkt))

    def _deliver(self, horizon: float) -> None:
        while self.heap and self.heap[0][0] <= horizon:
            due, _, d, pkt = heapq.heappop(self.heap)
            try:
                os.write(self.fds[d.dst], pkt)
                self.sent += 1
            except OSError as e:  # a host brought its TUN down: count, never crash the wire
                self.core.drops.setdefault("write_error", 0)
                self.core.drops["write_error"] += 1
                log.debug("write to host %d failed: %s", d.dst, e)
            self.core.delivered(d)
            late = time.monotonic() - due
            # Loop overhead varies with load, so the bias tracks the median lateness
            # (sign steps: robust to the rare multi-ms stall that a mean would chase).
            step = _BIAS_STEP_S if late > 0 else -_BIAS_STEP_S
            self.bias = min(_MAX_BIAS_S, max(0.0, self.bias + step))
            self.late.append(late)
            if late > self.late_max:
                self.late_max = late
            if late > _LATE_WARN_S:
                self.n_late += 1
                self._stall(due, due + late)

    def _stall(self, start: float, end: float) -> None:
        # Deliveries come in due order, so a new stall either extends the last one or follows it.
        if self.stalls and start <= self.stalls[-1][1]:
            self.stalls[-1][1] = max(self.stalls[-1][1], end)
        else:
            self.stalls.append([start, end])

    def close(self) -> None:
        for r in getattr(self, "replays", []):
            r.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _raise_priority() -> None:
    """Real-time round-robin (or nice -10) for this process only: on a shared machine a
    time-shared wire falls milliseconds behind.  The loop blocks in epoll, so it cannot
    starve others.  ``NETSIM_WIRE_RT=0`` opts out."""
    if os.environ.get("NETSIM_WIRE_RT", "1") == "0":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(_RT_PRIORITY))
    except OSError:
        try:
            os.nice(-10)
        except OSError:
            log.info("could not raise the wire's priority")


def run(state: dict[str, Any], ready: Any = sys.stdout, go: Any = sys.stdin) -> None:
    """Run the wire for ``state`` until SIGTERM/SIGINT (see the module docstring)."""
    loop = _Loop(state)

    def _stop(signum: int, frame: Any) -> None:
        # Raising (not just flagging) breaks out of epoll.poll, which PEP 475 would resume.
        # Once only: a second signal (the parent-death SIGTERM, then `down`'s) must not
        # interrupt the cleanup in the finally block below.
        if loop.stop:
            return
        loop.stop = True
        raise _Stopped

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _raise_priority()
    timer = Timer()
    try:
        loop.open()
        bias = calibrate(timer)
        ready.write(f"TUNS {bias:.6f}\n")
        ready.flush()
        go.readline()
        t0 = time.monotonic()
        loop.start(t0)
        ready.write(f"T0 {t0!r}\n")
        ready.flush()
        loop.run(timer, bias)
    except _Stopped:
        pass
    finally:
        if hasattr(loop, "core"):
            loop.write_counters()
        loop.close()
        timer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netsim.namespaces.wire", description=__doc__)
    ap.add_argument("--state", required=True, help="netsim state file (/run/netsim/TAG.json)")
    ap.add_argument("--pdeathsig", action="store_true",
                    help="die with the parent (used when `up` runs in-process)")
    args = ap.parse_args(argv)
    if args.pdeathsig:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before prctl took effect
            return 1
    logging.basicConfig(level=logging.WARNING)
    with open(args.state) as f:
        state = json.load(f)
    run(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
