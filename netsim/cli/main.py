"""``netsim`` / ``python -m netsim``: the command line (entry point ``netsim.__main__:main``).

``trace`` lives in :mod:`netsim.cli.trace`. The root-only backends add their subcommands
(``up``, ``down`` in :mod:`netsim.cli.net`; ``probe`` in :mod:`netsim.cli.probe`) through a
function ``add_cli(subparsers)`` in their module; the
modules listed in :data:`CLI_PLUGINS` are imported only if present, and a plugin that fails
to import is skipped with a warning so the other subcommands keep working.

Exit codes: 0 ok, 1 out of tolerance, 2 bad input, 3 no root or kernel feature, 4 cleanup
incomplete (see :mod:`netsim.cli`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from . import EXIT_BAD_INPUT
from .trace import add_cli as add_trace_cli

__all__ = ["CLI_PLUGINS", "build_parser", "main"]

logger = logging.getLogger(__name__)

#: Modules that may expose ``add_cli(subparsers)``, in help order.
CLI_PLUGINS = ("netsim.cli.net", "netsim.cli.probe")


def _load_plugins(subparsers: argparse._SubParsersAction) -> None:
    for name in CLI_PLUGINS:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            module = importlib.import_module(name)
        except Exception as exc:  # a broken backend must not take `netsim trace` down with it
            logger.warning("netsim: skipping %s subcommands (%s: %s)", name, type(exc).__name__, exc)
            continue
        add = getattr(module, "add_cli", None)
        if callable(add):
            add(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netsim", description="Emulated slow, time-varying links.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_trace_cli(sub)
    _load_plugins(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.getLogger().setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(func(args) or 0)
    except (ValueError, FileNotFoundError, IsADirectoryError) as exc:
        print(f"netsim: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # `netsim ... | head`: the reader left; point stdout at /dev/null so the exit flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0

