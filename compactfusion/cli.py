"""Command line: ``compactfusion bench CONFIG.yaml --out DIR [--quick]``, ``compactfusion report DIR``.

Exit codes: 0 done, 2 bad input (config, arguments, an unwritable --out, a junk results.json).
``bench`` writes ``DIR/partial.json`` (every sample measured so far) as it goes, so a crash or
Ctrl-C keeps what finished.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="compactfusion", description="CompactFusion tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="benchmark single / ring / patch / distrifusion / compressed modes over a netsim link")
    b.add_argument("config", type=Path, help="YAML config (examples/compactfusion/*.yaml)")
    b.add_argument("--out", type=Path, required=True, help="output directory (results.json, report.md, PNGs)")
    b.add_argument("--quick", action="store_true", help="apply the config's quick overrides (a few minutes)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("-v", "--verbose", action="store_true", help="INFO logging")
    r = sub.add_parser("report", help="write DIR/report.md again from DIR/results.json")
    r.add_argument("dir", type=Path)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ccomm.configfile import writable_dir

    from .bench import bench, load_config

    if args.cmd == "report":
        from .bench.report import rerender

        try:
            print(f"written {rerender(args.dir)}")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(args.config)
        if args.quick:
            cfg.quick_version()  # validate the overrides before spawning anything
        writable_dir(args.out)  # before the run, not after it
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "compactfusion " + " ".join(sys.argv[1:] if argv is None else argv)
    res = bench(cfg, args.out, quick=args.quick, progress=not args.no_progress, command=command.strip())
    missed = [t for t in res["targets"] if t["met"] is False]
    print(f"written to {args.out}/results.json and {args.out}/report.md "
          f"({len(res['targets']) - len(missed)} of {len(res['targets'])} targets met)")
    for t in missed:
        print(f"  missed: {t['target']} ({t['where']}): {t['value']} {t['op']} {t['threshold']}")
    return 0
