"""``netsim trace``: show, convert, generate, predict with and plot bandwidth traces."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from . import EXIT_OK, parse_size
from ..model.link import Link
from ..model.trace import Trace

__all__ = ["add_cli", "plot_trace", "summarize"]


def _load(path: str, bin_ms: int) -> Trace:
    return Trace.load(path, bin_ms=bin_ms)


def summarize(trace: Trace) -> dict[str, object]:
    """Numbers ``trace show`` prints."""
    outs = trace.outages()
    return {
        "points": len(trace.times_s),
        "loop": trace.loop,
        "period_s": trace.period_s,
        "last_change_s": trace.times_s[-1],
        "min_mbps": min(trace.mbps),
        "mean_mbps": trace.mean_mbps(),
        "max_mbps": max(trace.mbps),
        "outages": len(outs),
        "outage_s": sum(e - s for s, e in outs),
        "max_outage_s": trace.max_outage_s(),
    }


def plot_trace(trace: Trace, out: str | Path, *, until_s: float | None = None, title: str = "") -> None:
    """Step plot of the rate over ``[0, until_s]`` (default: one period, or past the last change)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: write a file, never open a window
    import matplotlib.pyplot as plt

    end = until_s if until_s is not None else (trace.end_s if trace.loop else max(1.0, 1.1 * trace.times_s[-1]))
    if not (math.isfinite(end) and end > 0):
        raise ValueError(f"until_s={until_s!r} must be finite and > 0")
    xs, ys = [], []
    period = trace.end_s if trace.loop else math.inf
    q = 0
    while True:
        base = q * period if trace.loop else 0.0
        for t, r in zip(trace.times_s, trace.mbps):
            if base + t >= end:
                break
            xs.append(base + t)
            ys.append(r)
        q += 1
        if not trace.loop or q * period >= end:
            break
    xs.append(end)
    ys.append(ys[-1])
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.step(xs, ys, where="post")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("rate (Mbit/s)")
    ax.set_xlim(0, end)
    ax.set_ylim(bottom=0)
    ax.set_title(title or f"mean {trace.mean_mbps():.3g} Mbit/s")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _cmd_show(args: argparse.Namespace) -> int:
    trace = _load(args.file, args.bin_ms)
    for key, value in summarize(trace).items():
        print(f"{key:>14}: {value:.6g}" if isinstance(value, float) else f"{key:>14}: {value}")
    if args.png:
        plot_trace(trace, args.png, title=Path(args.file).name)
        print(f"{'plot':>14}: {args.png}")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    plot_trace(_load(args.file, args.bin_ms), args.output, until_s=args.until_s, title=Path(args.file).name)
    print(args.output)
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    trace = _load(args.input, args.bin_ms)
    if args.resample_s:
        trace = trace.resample(args.resample_s)
    trace.save(args.output, duration_s=args.duration_s)
    print(args.output)
    return EXIT_OK


def _parse_points(text: str) -> list[tuple[float, float]]:
    pts = []
    for item in text.split(","):
        try:
            t, r = item.split(":")
            pts.append((float(t), float(r)))
        except ValueError:
            raise ValueError(f"--points item {item!r}: expected TIME_S:MBPS") from None
    return pts


def _cmd_gen(args: argparse.Namespace) -> int:
    if args.kind == "constant":
        trace = Trace.constant(args.mbps)
    elif args.kind == "steps":
        trace = Trace.steps(_parse_points(args.points), loop=args.period_s is not None, period_s=args.period_s)
    else:
        trace = Trace.random_walk(
            args.start, args.low, args.high, args.step_s, args.duration_s, sigma=args.sigma, seed=args.seed
        )
    duration = getattr(args, "duration_s", None)
    trace.save(args.output, duration_s=duration)
    print(args.output)
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    link = Link(None, args.latency_ms, trace=_load(args.file, args.bin_ms))
    t = link.transfer_time(args.bytes, args.start_s)
    print(f"{t:.6f}")
    return EXIT_OK


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    tp = subparsers.add_parser("trace", help="inspect, convert, generate and plot bandwidth traces")
    tsub = tp.add_subparsers(dest="trace_cmd", required=True, metavar="{show,plot,convert,gen,predict}")

    def with_bin(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--bin-ms", type=int, default=1, help="Mahimahi bin width in ms (default 1)")
        return p

    p = with_bin(tsub.add_parser("show", help="summary of a trace (.csv or Mahimahi)"))
    p.add_argument("file")
    p.add_argument("--png", help="also plot it to this PNG")
    p.set_defaults(func=_cmd_show)

    p = with_bin(tsub.add_parser("plot", help="plot a trace to PNG"))
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--until-s", type=float, help="plot [0, UNTIL_S] (default one period)")
    p.set_defaults(func=_cmd_plot)

    p = with_bin(tsub.add_parser("convert", help="convert between CSV and Mahimahi (by file extension)"))
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--duration-s", type=float, help="length to write for a non-looping trace to Mahimahi")
    p.add_argument("--resample-s", type=float, help="resample to this step first (mean per bin)")
    p.set_defaults(func=_cmd_convert)

    gp = tsub.add_parser("gen", help="generate a trace")
    gsub = gp.add_subparsers(dest="kind", required=True)
    p = gsub.add_parser("constant")
    p.add_argument("--mbps", type=float, required=True)
    p.add_argument("--duration-s", type=float, help="length for Mahimahi output")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_cmd_gen)
    p = gsub.add_parser("steps")
    p.add_argument("--points", required=True, help="T:MBPS,T:MBPS,... starting at 0, e.g. 0:100,30:10")
    p.add_argument("--period-s", type=float, help="loop with this period")
    p.add_argument("--duration-s", type=float, help="length for Mahimahi output of a non-looping trace")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_cmd_gen)
    p = gsub.add_parser("walk")
    p.add_argument("--start", type=float, required=True)
    p.add_argument("--low", type=float, required=True)
    p.add_argument("--high", type=float, required=True)
    p.add_argument("--step-s", type=float, default=1.0)
    p.add_argument("--duration-s", type=float, required=True)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_cmd_gen)

    p = with_bin(tsub.add_parser("predict", help="time to move --bytes over the trace"))
    p.add_argument("file")
    p.add_argument("--bytes", type=parse_size, required=True, help="e.g. 4MiB, 2MB, 1500")
    p.add_argument("--start-s", type=float, default=0.0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.set_defaults(func=_cmd_predict)
