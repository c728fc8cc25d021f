"""``netsim probe``: measure a net (a running one by ``--tag``, or a temporary one) against its link."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from netsim.cli import EXIT_BAD_INPUT, EXIT_NO_ROOT, EXIT_TOLERANCE, add_link_args, parse_size, topo_from_args
from netsim.cli.net import bring_up
from netsim.namespaces import netns
from netsim.probe.emulated import probe_emulate
from netsim.probe.namespace import probe

__all__ = ["add_cli"]


def _cmd_probe(args: argparse.Namespace) -> int:
    if args.backend == "emulate":
        try:
            topo = topo_from_args(args)
        except ValueError as e:
            print(f"netsim: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        rep = probe_emulate(topo, nbytes=args.bytes or (1 << 20), samples=min(args.samples, 50))
        print(rep.table())
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rep.to_json(), f, indent=1)
        return 0 if rep.ok else EXIT_TOLERANCE
    try:
        if args.tag_attach:
            net = netns.attach(args.tag_attach)
        else:
            args.tag = args.tag or "probe"
            net = bring_up(args, topo_from_args(args), persist=False)
    except (PermissionError, netns.FeatureError) as e:
        print(f"netsim: {e}", file=sys.stderr)
        return EXIT_NO_ROOT
    with net:
        rep = probe(net, args.pairs, samples=args.samples, nbytes=args.bytes,
                    duplex=not args.no_duplex, gloo=args.gloo)
    print(rep.table())
    if rep.wire:
        w = rep.wire
        print(f"wire: sent {w['sent']} drops {w['drops']}; lateness of the last "
              f"{8192} packets p50 {w['late_p50_s'] * 1e3:.3f} ms p99 "
              f"{w['late_p99_s'] * 1e3:.3f} ms; whole run max {w['late_max_s'] * 1e3:.1f} ms, "
              f"{w.get('late_over_1ms_fraction', 0.0):.2%} of packets over 1 ms late"
              + (" (the wire is the bottleneck)" if w["bottleneck"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.to_json(), f, indent=1)
    return 0 if rep.ok else EXIT_TOLERANCE


def add_cli(subparsers: Any) -> None:
    """``netsim probe``: an existing net (``--tag``) or a temporary one from LINK FLAGS."""
    p = subparsers.add_parser("probe", help="measure RTT and goodput against the configured link")
    add_link_args(p)
    p.add_argument("--tag", dest="tag_attach", help="probe the running net with this tag")
    p.add_argument("--backend", choices=("netns", "mininet", "emulate"), default="netns")
    p.add_argument("--delay", choices=("auto", "netem", "wire"), default="auto")
    p.add_argument("--pairs", choices=("ring", "all"), default="ring")
    p.add_argument("--samples", type=int, default=200, help="ping-pongs per pair (default 200)")
    p.add_argument("--bytes", type=parse_size, default=None,
                   help="bulk size (default max(8 MiB, 3 s of the rate))")
    p.add_argument("--no-duplex", action="store_true", help="skip the full-duplex run")
    p.add_argument("--gloo", action="store_true", help="also time gloo send/all-reduce/all-gather")
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=_cmd_probe, tag=None)
