"""``plan_up(topo, caps, opts) -> Plan``: what netsim.namespaces.netns will create, computed purely
(docs/design/netsim.md#namespace-layout).

Three layouts:

* ``veth``: namespaces joined by veth (a bridge in ``nsm-<tag>-sw`` for n > 2), htb on both
  ends, netem under htb when the kernel has it.  With no delay, jitter or loss to emulate this
  needs neither netem nor the wire.
* ``wire``: one TUN ``nsmt0`` per host instead of veth and bridge; htb on each TUN shapes the
  uplink and :mod:`netsim.namespaces.wire` adds delay, jitter, loss, the n > 2 downlinks and mesh pairs.
  Outages (rate 0, which htb cannot take) move all shaping into the wire.

The plan is data (command lines and the wire's configuration); :mod:`netsim.namespaces.executor` runs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from netsim.namespaces.commands import (Cmd, addr, bridge, bridge_port, check_scoped, gso_off, host_ns,
                             htb, link_mtu, link_up, netem, netem_limit, ns_add, subnet_octet,
                             switch_ns, sysctl, veth)
from netsim.model.link import Link
from netsim.model.topo import Topo
from netsim.model.trace import Trace

__all__ = ["Caps", "HostPlan", "Plan", "UpOptions", "FeatureError", "plan_up"]

_MIN_BUF = 16 << 20
#: Above this rate the device MTU is raised: per-packet cost on this machine's 2 cores caps
#: 1500-byte frames at ~350 Mbit/s through the Python wire and ~570 Mbit/s on a veth with
#: GSO off (measured), while 65000-byte frames carry 1 Gbit/s.
_JUMBO_ABOVE_MBPS = 300.0
_JUMBO_MTU = 65000
_MIN_WIRE_QUEUE = 4 << 20
_MIN_SHAPED_QUEUE_PKTS = 100
#: Depth of the wire's token buckets.  The loop reads packets up to a few ms late under load
#: (wire p99 lateness); with depth 0 each late read delays every later packet of a backlog
#: for good (measured: 4-rank gloo all-gather 10 % slow).  5 ms of line rate is what a
#: message can gain over the depth-0 model: 0.3 % of a 4 MiB transfer at 20 Mbit/s.
_WIRE_BURST_S = 5e-3
_DEV_VETH, _DEV_TUN = "nsm0", "nsmt0"


class FeatureError(RuntimeError):
    """The kernel lacks what the requested layout needs (CLI exit code 3)."""


@dataclass(frozen=True)
class Caps:
    """What the kernel offers, from :func:`netsim.namespaces.netns.detect`."""

    netem: bool = False
    tun: bool = True
    htb: bool = True


@dataclass(frozen=True)
class UpOptions:
    """Options of ``up``; ``delay`` picks netem, the wire, or whichever the kernel allows."""

    tag: str = "net"
    delay: str = "auto"
    subnet: int | None = None
    seed: int = 0
    mtu: int | None = None
    min_step_s: float = 0.1

    def __post_init__(self) -> None:
        host_ns(self.tag, 0)  # validates the tag
        if self.delay not in ("auto", "netem", "wire"):
            raise ValueError(f"delay must be one of auto, netem, wire; got {self.delay!r}")
        if self.subnet is not None and not (0 <= self.subnet <= 255):
            raise ValueError(f"subnet must be in [0, 255], got {self.subnet!r}")
        if self.mtu is not None and not (576 <= self.mtu <= 65000):
            raise ValueError(f"mtu must be in [576, 65000], got {self.mtu!r}")
        if not (0.001 <= self.min_step_s <= 60):
            raise ValueError(f"min_step_s must be in [0.001, 60], got {self.min_step_s!r}")


@dataclass(frozen=True)
class HostPlan:
    index: int
    ns: str
    addr: str
    dev: str


@dataclass(frozen=True)
class Plan:
    """Commands before the wire starts, the wire's configuration (or None), commands after."""

    tag: str
    mode: str
    hosts: tuple[HostPlan, ...]
    namespaces: tuple[str, ...]
    pre: tuple[Cmd, ...]
    post: tuple[Cmd, ...]
    wire: dict[str, Any] | None
    mtu: int
    notes: tuple[str, ...] = field(default=())

    def commands(self) -> tuple[Cmd, ...]:
        return self.pre + self.post

    def lines(self) -> list[str]:
        """Human-readable plan, as ``netsim up --dry-run`` prints it."""
        out = [str(c) for c in self.pre]
        if self.wire is not None:
            out.append(f"# start python -m netsim.namespaces.wire (tun={self.wire['tun']}, "
                       f"{len(self.wire['channels'])} channels, "
                       f"{len(self.wire['changes'])} trace replays)")
        out += [str(c) for c in self.post]
        return out


def _trace_json(t: Trace) -> dict[str, Any]:
    return {"times": list(t.times_s), "mbps": list(t.mbps), "loop": t.loop,
            "period_s": t.end_s if t.loop else None}


def _rate_json(link: Link, factor: float) -> dict[str, Any]:
    if link.trace is None:
        return {"rate_bps": float(link.bandwidth_mbps) * 1e6 * factor}  # type: ignore[arg-type]
    return {"trace": _trace_json(link.trace), "factor": factor}


def _all_links(topo: Topo) -> list[Link]:
    return [topo.link, *topo.hosts.values(), *topo.pairs.values()]


def _ns_sysctls(ns: str, buf: int) -> list[Cmd]:
    return [
        sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1"),
        sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1"),
        # Otherwise every exchange after a compute pause restarts slow start (not modeled).
        sysctl(ns, "net.ipv4.tcp_slow_start_after_idle", "0"),
        sysctl(ns, "net.ipv4.tcp_rmem", f"4096 131072 {buf}"),
        sysctl(ns, "net.ipv4.tcp_wmem", f"4096 16384 {buf}"),
        link_up(ns, "lo"),
    ]


def _choose(topo: Topo, caps: Caps, opts: UpOptions) -> str:
    links = _all_links(topo)
    impaired = any(lk.latency_ms > 0 or lk.jitter_ms > 0 or lk.loss > 0 for lk in links)
    outages = any(lk.trace is not None and lk.trace.outages() for lk in links)
    mesh = not topo.shared and topo.n > 2
    reorder = any(lk.reorder for lk in links)
    # netem on a host's egress gives every destination the same delay.
    uniform_delay = all(topo.pair_link(i, j).latency_ms == topo.link.latency_ms
                        and topo.pair_link(i, j).jitter_ms == topo.link.jitter_ms
                        and topo.pair_link(i, j).loss == topo.link.loss
                        for i in range(topo.n) for j in range(topo.n) if i != j)
    netem_ok = caps.netem and not outages and not mesh and uniform_delay
    if opts.delay == "netem":
        if not netem_ok:
            raise FeatureError("delay='netem' needs the netem qdisc (absent from this kernel) and "
                               "a topology without outages, mesh pairs or per-pair delays")
        return "veth"
    if opts.delay == "wire" or outages or mesh or (impaired and not netem_ok) or reorder:
        if not caps.tun:
            raise FeatureError("the delay wire needs /dev/net/tun")
        return "wire"
    return "veth"


def plan_up(topo: Topo, caps: Caps, opts: UpOptions) -> Plan:
    """The full plan for ``topo`` given the kernel's ``caps``; pure and deterministic."""
    if not caps.htb:
        raise FeatureError("netsim.namespaces.netns needs the htb qdisc")
    n, tag = topo.n, opts.tag
    if not 2 <= n <= 250:
        # One host has no link to emulate (and no pair to size the buffers from).
        raise ValueError(f"n={n}: a netsim network has 2 to 250 hosts (-n in [2, 250])")
    k = subnet_octet(tag) if opts.subnet is None else opts.subnet
    mode = _choose(topo, caps, opts)
    peak = max(lk.peak_mbps for lk in _all_links(topo))
    mtu = opts.mtu or (_JUMBO_MTU if peak > _JUMBO_ABOVE_MBPS else topo.link.mtu)
    dev = _DEV_TUN if mode == "wire" else _DEV_VETH
    hosts = tuple(HostPlan(i, host_ns(tag, i), f"10.213.{k}.{i + 1}", dev) for i in range(n))
    rtt = max(topo.pair_link(i, j).rtt_s + 2 * topo.pair_link(i, j).jitter_s
              for i in range(n) for j in range(n) if i != j)
    buf = max(_MIN_BUF, math.ceil(4 * peak * 1e6 / 8 * rtt))
    namespaces = [h.ns for h in hosts]
    bridged = mode == "veth" and n > 2
    if bridged:
        namespaces.append(switch_ns(tag))
    pre: list[Cmd] = [ns_add(ns) for ns in namespaces]
    for h in hosts:
        pre += _ns_sysctls(h.ns, buf)
    notes: list[str] = []

    def factor(link: Link) -> float:
        return dataclasses.replace(link, mtu=mtu).wire_factor(l2=(mode == "veth"))

    def shaped(ns: str, d: str, link: Link) -> list[Cmd]:
        return htb(ns, d, link.rate_trace.rate_mbps(0.0) * 1e6 * factor(link), mtu,
                   14 if mode == "veth" else 0)

    changes: list[dict[str, Any]] = []

    def replay(ns: str, d: str, link: Link) -> None:
        if link.trace is not None and len(link.trace.times_s) > 1 or (
                link.trace is not None and link.trace.loop):
            tr = link.trace
            # Steps closer than min_step_s are averaged: tc cannot be re-rated every packet.
            if any(b - a < opts.min_step_s for a, b in zip(tr.times_s, tr.times_s[1:])):
                tr = tr.resample(opts.min_step_s)
            changes.append({"ns": ns, "dev": d, "mtu": mtu, "l2": 14 if mode == "veth" else 0,
                            "factor": factor(link), **_trace_json(tr)})

    post: list[Cmd] = []
    wire: dict[str, Any] | None = None
    if mode == "veth":
        sw = switch_ns(tag)
        if bridged:
            pre += [sysctl(sw, "net.ipv6.conf.all.disable_ipv6", "1"),
                    sysctl(sw, "net.ipv6.conf.default.disable_ipv6", "1"), bridge(sw),
                    link_up(sw, "nsmbr")]
        else:
            pre.append(veth(hosts[0].ns, dev, hosts[1].ns, dev))
        for h in hosts:
            hl = topo.host_link(h.index)
            if bridged:
                port = f"nsmp{h.index}"
                pre += [veth(h.ns, dev, sw, port), bridge_port(sw, port), link_mtu(sw, port, mtu),
                        gso_off(sw, port), link_up(sw, port)]
                pre += shaped(sw, port, hl)  # the switch port's egress is host i's downlink
                replay(sw, port, hl)
            pre += [addr(h.ns, dev, f"{h.addr}/24"), link_mtu(h.ns, dev, mtu), gso_off(h.ns, dev),
                    link_up(h.ns, dev)]
            pre += shaped(h.ns, dev, hl)
            replay(h.ns, dev, hl)
            pl = topo.link
            if pl.latency_ms > 0 or pl.loss > 0:
                rate = hl.peak_mbps * factor(hl) * 1e6
                pre.append(netem(h.ns, dev, pl.latency_s, pl.jitter_s,
                                 netem_limit(pl.queue_limit, rate, pl.latency_s, pl.jitter_s, mtu),
                                 pl.loss))
        if changes:
            wire = {"tun": False, "channels": [], "resources": {}, "changes": changes,
                    "seed": opts.seed, "mtu": mtu}
    else:
        outages = any(lk.trace is not None and lk.trace.outages() for lk in _all_links(topo))
        mesh = not topo.shared
        resources: dict[str, Any] = {}
        channels = []
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                pl = topo.pair_link(i, j)
                res: list[str] = []
                if mesh and n > 2:
                    res = [f"pair{i}-{j}"]
                    resources[res[0]] = _rate_json(pl, factor(pl))
                else:
                    if outages:
                        res.append(f"up{i}")
                        resources[f"up{i}"] = _rate_json(topo.host_link(i), factor(topo.host_link(i)))
                    if n > 2 or outages:
                        res.append(f"down{j}")
                        resources[f"down{j}"] = _rate_json(topo.host_link(j),
                                                           factor(topo.host_link(j)))
                rate = max(topo.host_link(i).peak_mbps, pl.peak_mbps) * 1e6
                two_bdp = math.ceil(2 * rate * pl.rtt_s / 8)
                # Where the wire shapes (mesh pairs, n > 2 downlinks) nothing upstream pushes
                # back on TCP (the TUN frees each packet at once, so TCP small queues never
                # engage): a 4 MiB FIFO became seconds of queue and starved the reverse flow's
                # ACKs (measured: duplex 8.1 of 10 Mbit/s).  There the queue is 2 BDP (at least
                # 100 packets); through outages the wire must hold packets, so 4 MiB stays.
                floor = _MIN_WIRE_QUEUE if outages or not res else _MIN_SHAPED_QUEUE_PKTS * mtu
                queue = max(floor, two_bdp, pl.queue_limit * mtu if pl.queue_packets else 0)
                channels.append({"src": i, "dst": j, "latency_s": pl.latency_s,
                                 "jitter_s": pl.jitter_s, "loss": pl.loss, "resources": res,
                                 "queue_bytes": queue, "reorder": pl.reorder})
        for h in hosts:
            post += [addr(h.ns, dev, f"{h.addr}/24"), link_mtu(h.ns, dev, mtu),
                     gso_off(h.ns, dev), link_up(h.ns, dev)]
            if not outages and not (mesh and n > 2):
                hl = topo.host_link(h.index)
                post += shaped(h.ns, dev, hl)
                replay(h.ns, dev, hl)
        if outages:
            notes.append("outages: all shaping is done by the wire (htb cannot take rate 0)")
        wire = {"tun": True, "dev": dev, "channels": channels, "resources": resources,
                "changes": changes, "seed": opts.seed, "mtu": mtu, "burst_s": _WIRE_BURST_S}
    plan = Plan(tag, mode, hosts, tuple(namespaces), tuple(pre), tuple(post), wire, mtu,
                tuple(notes))
    for c in plan.commands():
        check_scoped(c)
    return plan
