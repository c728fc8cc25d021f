"""Pure builders of the ``ip``/``tc`` command lines that netsim.namespaces.netns runs
(docs/design/netsim.md#shaping-recipe, docs/design/netsim.md#builders-and-executor).

Every builder returns :class:`Cmd` (an argv and the argv that undoes it) and never touches the
system, so plans are golden-tested without root.  Every command is scoped to a netsim namespace:
``ip netns add|del <ns>``, ``ip -n <ns> ...``, ``tc -n <ns> ...`` or ``ip netns exec <ns> ...``;
:func:`check_scoped` enforces that static guarantee.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

__all__ = [
    "NS_RE",
    "TAG_RE",
    "Cmd",
    "addr",
    "bridge",
    "bridge_port",
    "check_scoped",
    "gso_off",
    "host_ns",
    "htb",
    "htb_change_line",
    "htb_params",
    "link_mtu",
    "link_up",
    "netem",
    "netem_limit",
    "ns_add",
    "subnet_octet",
    "switch_ns",
    "sysctl",
    "veth",
]

TAG_RE = re.compile(r"^[a-z0-9]{1,8}$")
#: Every namespace netsim may create or delete matches this; nothing else is ever touched.
NS_RE = re.compile(r"^nsm-[a-z0-9]{1,8}-(h\d+|sw)$")
_ETH_HEADER = 14


@dataclass(frozen=True)
class Cmd:
    """One command line and the command line that undoes it (``None``: undone by a parent)."""

    argv: tuple[str, ...]
    undo: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) and a for a in self.argv):
            raise ValueError(f"argv must be non-empty strings, got {self.argv!r}")

    def __str__(self) -> str:
        return " ".join(self.argv)


def _check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise ValueError(f"tag must match [a-z0-9]{{1,8}}, got {tag!r}")
    return tag


def host_ns(tag: str, i: int) -> str:
    """Namespace of host ``i``: ``nsm-<tag>-h<i>``."""
    if not isinstance(i, int) or i < 0:
        raise ValueError(f"host index must be an int >= 0, got {i!r}")
    return f"nsm-{_check_tag(tag)}-h{i}"


def switch_ns(tag: str) -> str:
    """Namespace holding the bridge for n > 2: ``nsm-<tag>-sw``."""
    return f"nsm-{_check_tag(tag)}-sw"


def subnet_octet(tag: str) -> int:
    """Third octet k of ``10.213.k.0/24``, derived from the tag so concurrent nets rarely clash."""
    return hashlib.blake2b(_check_tag(tag).encode(), digest_size=2).digest()[0]


def _ns(ns: str) -> str:
    if not NS_RE.match(ns):
        raise ValueError(f"namespace must match {NS_RE.pattern}, got {ns!r}")
    return ns


def ns_add(ns: str) -> Cmd:
    return Cmd(("ip", "netns", "add", _ns(ns)), ("ip", "netns", "del", ns))


def sysctl(ns: str, key: str, value: str) -> Cmd:
    """Set a sysctl inside ``ns`` only (``/proc/sys/net`` is per namespace); undone with it."""
    return Cmd(("ip", "netns", "exec", _ns(ns), "sysctl", "-q", "-w", f"{key}={value}"))


def link_up(ns: str, dev: str) -> Cmd:
    return Cmd(("ip", "-n", _ns(ns), "link", "set", "dev", dev, "up"))


def link_mtu(ns: str, dev: str, mtu: int) -> Cmd:
    return Cmd(("ip", "-n", _ns(ns), "link", "set", "dev", dev, "mtu", str(int(mtu))))


def veth(ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> Cmd:
    """A veth made inside ``ns_a`` with its peer placed straight into ``ns_b``.

    The root namespace never holds either end, even for a moment.
    """
    return Cmd(
        ("ip", "-n", _ns(ns_a), "link", "add", dev_a, "type", "veth",
         "peer", "name", dev_b, "netns", _ns(ns_b)),
        ("ip", "-n", ns_a, "link", "del", dev_a),
    )


def bridge(ns: str, dev: str = "nsmbr") -> Cmd:
    return Cmd(("ip", "-n", _ns(ns), "link", "add", dev, "type", "bridge"),
               ("ip", "-n", ns, "link", "del", dev))


def bridge_port(ns: str, port: str, br: str = "nsmbr") -> Cmd:
    return Cmd(("ip", "-n", _ns(ns), "link", "set", "dev", port, "master", br))


def addr(ns: str, dev: str, cidr: str) -> Cmd:
    return Cmd(("ip", "-n", _ns(ns), "addr", "add", cidr, "dev", dev))


def gso_off(ns: str, dev: str) -> Cmd:
    """One segment per GSO packet: with GSO a full-duplex TCP exchange ran 33 % slow
    (docs/design/netsim.md#shaping-recipe)."""
    return Cmd(("ip", "-n", _ns(ns), "link", "set", "dev", dev, "gso_max_segs", "1"))


def htb_params(rate_bps: float, mtu: int, l2_header: int = _ETH_HEADER) -> tuple[int, int, int]:
    """(rate, burst, quantum) of docs/design/netsim.md#shaping-recipe: burst = max(2 frames, 1 ms of line
    rate), quantum = 1 frame.

    ``rate_bps`` is the line rate R = B * wire_factor in bit/s.
    """
    if not (rate_bps > 0 and math.isfinite(rate_bps)):
        raise ValueError(f"rate_bps must be positive and finite, got {rate_bps!r}")
    if not (68 <= mtu <= 65535):
        raise ValueError(f"mtu must be in [68, 65535], got {mtu!r}")
    frame = mtu + l2_header
    burst = max(2 * frame, math.ceil(rate_bps * 1e-3 / 8))
    return round(rate_bps), burst, frame


def _class_args(rate_bps: float, mtu: int, l2_header: int) -> tuple[str, ...]:
    rate, burst, quantum = htb_params(rate_bps, mtu, l2_header)
    return ("rate", f"{rate}bit", "ceil", f"{rate}bit", "burst", str(burst),
            "cburst", str(burst), "quantum", str(quantum))


def htb(ns: str, dev: str, rate_bps: float, mtu: int, l2_header: int = _ETH_HEADER) -> list[Cmd]:
    """Root htb with one class 1:1 at the line rate; htb's default pfifo leaf is kept
    (docs/design/netsim.md#shaping-recipe)."""
    return [
        Cmd(("tc", "-n", _ns(ns), "qdisc", "add", "dev", dev, "root", "handle", "1:",
             "htb", "default", "1"),
            ("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")),
        Cmd(("tc", "-n", ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1",
             "htb", *_class_args(rate_bps, mtu, l2_header))),
    ]


def htb_change_line(dev: str, rate_bps: float, mtu: int, l2_header: int = _ETH_HEADER) -> str:
    """One ``tc -batch`` line changing class 1:1; burst is restated since omitting it resets it."""
    return " ".join(("class", "change", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                     *_class_args(rate_bps, mtu, l2_header)))


def netem_limit(queue_packets: int, rate_bps: float, delay_s: float, jitter_s: float,
                mtu: int) -> int:
    """netem's queue: at least 1.5 BDP, since its default 1000 packets throttles long fat links."""
    bdp_frames = math.ceil(1.5 * rate_bps * (delay_s + jitter_s) / (8 * (mtu + _ETH_HEADER)))
    return max(int(queue_packets), bdp_frames)


def netem(ns: str, dev: str, delay_s: float, jitter_s: float, limit: int,
          loss: float = 0.0) -> Cmd:
    """netem under htb class 1:1 (uniform jitter, netem's default distribution)."""
    if delay_s < 0 or jitter_s < 0 or jitter_s > delay_s:
        raise ValueError(f"need 0 <= jitter_s <= delay_s, got {jitter_s!r}, {delay_s!r}")
    argv = ["tc", "-n", _ns(ns), "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
            "netem", "delay", f"{delay_s * 1e3:.3f}ms"]
    if jitter_s > 0:
        argv.append(f"{jitter_s * 1e3:.3f}ms")
    argv += ["limit", str(int(limit))]
    if loss > 0:
        argv += ["loss", f"{loss * 100:.6g}%"]
    return Cmd(tuple(argv))


def check_scoped(cmd: Cmd) -> None:
    """Raise ``ValueError`` unless ``cmd`` (and its undo) only touches a netsim namespace."""
    for argv in (cmd.argv, cmd.undo):
        if argv is None:
            continue
        ok = False
        if argv[:3] in (("ip", "netns", "add"), ("ip", "netns", "del"), ("ip", "netns", "exec")):
            ok = len(argv) >= 4 and bool(NS_RE.match(argv[3]))
        elif argv[0] in ("ip", "tc") and len(argv) >= 3 and argv[1] == "-n":
            ok = bool(NS_RE.match(argv[2]))
        if not ok:
            raise ValueError(f"command is not scoped to a netsim namespace: {' '.join(argv)}")
