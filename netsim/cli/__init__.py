"""Helpers shared by the ``netsim`` subcommands: exit codes, size parsing, link flags.

Backends plug their subcommands into ``python -m netsim`` by exposing
``add_cli(subparsers) -> None``; every parser they add sets ``func=callable(args) -> int``
with ``set_defaults`` (see :mod:`netsim.__main__`). They can reuse :func:`add_link_args` and
:func:`topo_from_args` for the common LINK FLAGS.
"""

from __future__ import annotations

import argparse
import re

from ..model.link import Link
from ..model.topo import Topo
from ..model.trace import Trace

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CLEANUP",
    "EXIT_NO_ROOT",
    "EXIT_OK",
    "EXIT_TOLERANCE",
    "add_link_args",
    "parse_size",
    "topo_from_args",
]


EXIT_OK = 0
EXIT_TOLERANCE = 1  # measured out of tolerance
EXIT_BAD_INPUT = 2
EXIT_NO_ROOT = 3  # no root or a missing kernel feature
EXIT_CLEANUP = 4  # cleanup incomplete

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"4MiB"`` -> 4194304, ``"2MB"`` -> 2000000, ``"1500"`` -> 1500 (bytes)."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a number with an optional unit {sorted(_UNITS)}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"size {text!r} must be >= 0")
    return int(round(value))


def add_link_args(p: argparse.ArgumentParser, *, require: bool = False) -> None:
    """LINK FLAGS: ``-n``, ``--bandwidth-mbps | --trace``, ``--latency-ms``, jitter, loss, mtu, topo, mesh."""
    p.add_argument("-n", type=int, default=2, help="number of hosts (default 2)")
    g = p.add_mutually_exclusive_group(required=False)
    g.add_argument("--bandwidth-mbps", type=float, help="payload rate in Mbit/s")
    g.add_argument("--trace", help="bandwidth trace (.csv = time_s,mbps; else Mahimahi)")
    p.add_argument("--bin-ms", type=int, default=1, help="Mahimahi bin width in ms (default 1)")
    p.add_argument("--latency-ms", type=float, default=None if require else 0.0, help="one-way latency in ms")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform jitter +- ms (<= latency)")
    p.add_argument("--loss", type=float, default=0.0, help="loss fraction in [0, 1)")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--topo", help="topology YAML (overrides the link flags)")
    p.add_argument("--mesh", action="store_true", help="independent pairs instead of shared host links")


def topo_from_args(args: argparse.Namespace) -> Topo:
    """Build the Topo described by :func:`add_link_args` flags; ``ValueError`` on bad input."""
    if getattr(args, "topo", None):
        topo = Topo.from_yaml(args.topo)
        if args.mesh and topo.shared:
            topo = Topo(topo.n, topo.link, hosts=dict(topo.hosts), pairs=dict(topo.pairs), shared=False)
        return topo
    if args.bandwidth_mbps is None and not args.trace:
        raise ValueError("one of --bandwidth-mbps or --trace (or --topo) is required")
    if args.latency_ms is None:
        raise ValueError("--latency-ms is required")
    trace = Trace.load(args.trace, bin_ms=args.bin_ms) if args.trace else None
    link = Link(args.bandwidth_mbps, args.latency_ms, args.jitter_ms, args.loss, trace, mtu=args.mtu)
    return Topo(args.n, link, shared=not args.mesh)
