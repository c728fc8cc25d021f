"""``netsim up`` and ``netsim down``: bring a namespace net up (either backend) or remove it.

The library calls are :func:`netsim.namespaces.netns.up` / ``down`` and
:func:`netsim.namespaces.mininet.up`; this module only maps flags onto them and their failures
onto the exit codes of :mod:`netsim.cli`.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from netsim.cli import EXIT_BAD_INPUT, EXIT_CLEANUP, EXIT_NO_ROOT, add_link_args, topo_from_args
from netsim.model.topo import Topo
from netsim.namespaces import netns
from netsim.namespaces.commands import NS_RE, TAG_RE
from netsim.namespaces.netns import Net
from netsim.namespaces.plan import Caps, FeatureError, UpOptions, plan_up

__all__ = ["add_cli", "bring_up"]


def _cli_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the documented failures to the CLI's exit codes (no root/feature 3, tag in use 2)."""
    @functools.wraps(func)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (PermissionError, FeatureError) as e:
            print(f"netsim: {e}", file=sys.stderr)
            return EXIT_NO_ROOT
        except FileExistsError as e:
            print(f"netsim: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return wrapped


def bring_up(args: argparse.Namespace, topo: Topo, *, persist: bool) -> Net:
    """``up`` for the backend named by ``args.backend`` (shared by ``up`` and ``probe``)."""
    mtu = args.mtu if getattr(args, "mtu", 1500) != 1500 else None
    if getattr(args, "backend", "netns") == "mininet":
        from netsim.namespaces import mininet

        return mininet.up(topo, tag=args.tag, delay=args.delay, mtu=mtu)
    return netns.up(topo, tag=args.tag, delay=args.delay, mtu=mtu, persist=persist)


@_cli_errors
def _cmd_up(args: argparse.Namespace) -> int:
    topo = topo_from_args(args)
    if args.dry_run:
        caps = netns.detect() if os.geteuid() == 0 else Caps()
        plan = plan_up(topo, caps, UpOptions(tag=args.tag, delay=args.delay,
                                             mtu=args.mtu if args.mtu != 1500 else None))
        print(f"# mode {plan.mode}, mtu {plan.mtu}, kernel {caps}")
        print("\n".join(plan.lines()))
        return 0
    net = bring_up(args, topo, persist=not args.run)
    for h in net.hosts:
        env = " ".join(f"{k}={v}" for k, v in net.env(h.index).items())
        print(f"h{h.index} {h.addr} dev {h.dev}: {' '.join(net.exec_prefix(h.index))}")
        print(f"   env {env}")
    if not args.run:
        print(f"up; remove with: netsim down --tag {args.tag}")
        return 0
    try:
        procs = [net.popen(h.index, ["sh", "-c", args.run]) for h in net.hosts]
        codes = [p.wait() for p in procs]
    finally:
        left = net.down()
    if left:
        return EXIT_CLEANUP
    return max(codes) if any(codes) else 0


@_cli_errors
def _cmd_down(args: argparse.Namespace) -> int:
    if not args.tag and not args.all:
        raise ValueError("down needs --tag T or --all")
    if args.tag and not TAG_RE.match(args.tag):
        raise ValueError(f"--tag {args.tag!r}: a tag matches [a-z0-9]{{1,8}}")
    if args.tag and not args.all and not netns.leftovers(args.tag):
        # Nothing to do is not a failure (down stays idempotent), but a mistyped tag should show.
        print(f"netsim: nothing to remove for tag {args.tag!r} (no namespace, state file or wire process)",
              file=sys.stderr)
        return 0
    if args.dry_run:
        rx = NS_RE if args.all else re.compile(rf"^nsm-{re.escape(args.tag)}-(h\d+|sw)$")
        for ns in netns.list_namespaces():
            if rx.match(ns):
                print(f"ip netns del {ns}")
        return 0
    left = netns.down(args.tag, all_=args.all)
    if getattr(args, "all", False) or getattr(args, "backend", None) == "mininet":
        try:
            from netsim.namespaces import mininet

            left += mininet.down_root_links()
        except ImportError:
            pass
    for item in left:
        print(f"left: {item}", file=sys.stderr)
    return EXIT_CLEANUP if left else 0


def add_cli(subparsers: Any) -> None:
    """``netsim up`` and ``netsim down`` (see ``netsim up --help``)."""
    p = subparsers.add_parser("up", help="bring an emulated network up (root)")
    add_link_args(p)
    p.add_argument("--backend", choices=("netns", "mininet"), default="netns")
    p.add_argument("--delay", choices=("auto", "netem", "wire"), default="auto")
    p.add_argument("--tag", default="net", help="name [a-z0-9]{1,8} (default net)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--run", help="run this shell command on every host, then tear down")
    p.set_defaults(func=_cmd_up)
    d = subparsers.add_parser("down", help="remove an emulated network (root)")
    d.add_argument("--tag")
    d.add_argument("--all", action="store_true", help="every netsim namespace on the machine")
    d.add_argument("--dry-run", action="store_true")
    d.set_defaults(func=_cmd_down)
