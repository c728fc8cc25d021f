"""Cost of the wire header (`ccomm.header`): `python -m ccomm.bench_header [--out FILE]`.

1. CPU: building and packing this rank's header, and unpacking and checking n peers'
   (`check_peers`), in microseconds per call, beside one int2 encode of a (64, 64) tensor.
2. Transport on 2 local gloo ranks (`ccomm.ranks.RankPool`, unshaped loopback): for
   several payload sizes, the median wall time of each call with ``check=True`` and with
   ``check=False``, measured interleaved in the same run (``repeats`` rounds, each round
   runs every variant once), and the slowdown check=True ÷ check=False. Loopback latency is tens of microseconds, so
   these times are the floor; on a link the extra header step of the checked same-size
   gather and all-reduce costs one more latency (the ring's n-1, log2 n with a log-depth
   algorithm), which `ccomm.schedule` models.

The markdown goes into FILE under the section "## Wire header cost" (replacing that
section if present, leaving the rest of the file alone) and is printed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["cpu_costs", "transport_costs", "to_markdown", "main"]

SECTION = "## Wire header cost"
SIZES = (4 << 10, 256 << 10, 4 << 20)
NOTE = (
    'The "allgather sizes unknown" rows time the same call in both columns (the header replaces the size '
    "step either way): their slowdown is this run's noise. With a load average far above the CPU count, "
    "absolute times are inflated, most of all the thread hand-offs of point-to-point waits "
    "(`send_recv` waits for the header, then for the data, through `ccomm.failfast`'s waiter thread)."
)
VARIANTS = ("allgather same_size", "allgather sizes unknown", "allreduce", "send_recv recv_nbytes")


def _us(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(best)


def cpu_costs(reps: int = 2000) -> dict[str, float]:
    """Microseconds per call of the header's CPU work (median of 5 batches of `reps`)."""
    from .header import WireHeader, check_peers
    from .registry import make_codec

    codec = make_codec("int2")
    x = torch.randn(64, 64)
    p = codec.encode(x)
    mine = WireHeader.of(p.meta, p.buffer.dtype, p.nbytes)
    packed = [mine.pack() for _ in range(8)]
    return {
        "build + pack own header": _us(lambda: WireHeader.of(p.meta, p.buffer.dtype, p.nbytes).pack(), reps),
        "unpack + check 2 headers": _us(lambda: check_peers(mine, packed[:2], rank=0, what="w"), reps),
        "unpack + check 8 headers": _us(lambda: check_peers(mine, packed, rank=0, what="w"), reps),
        "int2 encode (64, 64), for scale": _us(lambda: codec.encode(x), max(1, reps // 10)),
    }


def _calls(rank: int, nbytes: int) -> dict[str, Callable[[bool], Any]]:
    from .comm import allgather_payloads, allreduce_payload, send_recv
    from .payload import Payload, PayloadMeta

    raw = Payload(torch.zeros(nbytes, dtype=torch.uint8), PayloadMeta(torch.Size([nbytes]), torch.uint8))
    num = Payload(torch.zeros(nbytes // 4), PayloadMeta(torch.Size([nbytes // 4]), torch.float32))
    return {
        "allgather same_size": lambda c: allgather_payloads(raw, same_size=True, algo="ring", check=c),
        # Sizes unknown: the header replaces the size step either way; check=False has no
        # meaning here, so both columns time the same call (a control for the noise).
        "allgather sizes unknown": lambda c: allgather_payloads(raw, same_size=False, algo="ring", check=c),
        "allreduce": lambda c: allreduce_payload(num, algo="ring", check=c),
        "send_recv recv_nbytes": lambda c: send_recv(raw, 1 - rank, 1 - rank, recv_nbytes=nbytes, check=c),
    }


def _rank_job(rank: int, n: int, sizes: Sequence[int], repeats: int) -> dict[tuple[str, int, bool], float]:
    import torch.distributed as dist

    times: dict[tuple[str, int, bool], list[float]] = {}
    for nbytes in sizes:
        calls = _calls(rank, nbytes)
        for name, call in calls.items():  # untimed warm-up of every path
            call(True)
            call(False)
        for _ in range(repeats):
            for name, call in calls.items():
                for check in (True, False):
                    dist.barrier()
                    t0 = time.perf_counter()
                    call(check)
                    times.setdefault((name, nbytes, check), []).append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def transport_costs(sizes: Sequence[int] = SIZES, repeats: int = 30) -> dict[tuple[str, int, bool], float]:
    """Median seconds per call on rank 0 of 2 gloo ranks, per (variant, bytes, check)."""
    from .ranks import RankPool

    with RankPool(2, group_timeout_s=300.0) as pool:
        return pool.run(_rank_job, list(sizes), repeats, timeout=3600.0)[0]


def _kib(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def to_markdown(cpu: dict[str, float], tr: dict[tuple[str, int, bool], float], command: str, repeats: int,
                load: tuple[float, ...] = ()) -> str:
    from .header import HEADER_BYTES

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    busy = f"; host load average at start {', '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} CPUs" if load else ""
    lines = [
        SECTION, "",
        f"Command: `{command}`  ",
        f"Date: {now}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}{busy}  ",
        f"A header is {HEADER_BYTES} bytes (15 int64: format version, codec name and spec digest, dtypes, "
        "byte length, shape). Where a call already learnt its peers' sizes (gathers of unknown sizes, "
        "log-depth rounds, `send_recv` without `recv_nbytes`) it replaces the 8-byte size, so checking "
        "adds no step; elsewhere `check=True` adds one header step (a gather for same-size gathers and "
        "all-reduce; on CPU `send_recv` sends it with the data).", "",
        "CPU per call (median of 5 batches):", "",
        "| work | us |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in cpu.items()], "",
        f"Transport, 2 gloo ranks on loopback, rank 0's median of {repeats} interleaved calls "
        "(`algo=\"ring\"`):", "",
        "| call | payload | check=True ms | check=False ms | slowdown |", "|---|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        for nbytes in sorted({k[1] for k in tr}):
            on, off = tr[(name, nbytes, True)], tr[(name, nbytes, False)]
            lines.append(f"| {name} | {_kib(nbytes)} | {on * 1e3:.3f} | {off * 1e3:.3f} | {on / off:.2f} |")
    lines += ["", NOTE]
    return "\n".join(lines) + "\n"


def _splice(text: str, section: str) -> str:
    """`text` with its SECTION replaced by `section` (appended when absent)."""
    start = text.find(SECTION)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(SECTION))
    return text[:start] + section + ("" if end < 0 else "\n" + text[end + 1:])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ccomm.bench_header", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/codecs.md"))
    args = ap.parse_args(argv)
    if args.repeats < 1:
        print(f"error: --repeats {args.repeats} must be >= 1", file=sys.stderr)
        return 2
    command = "python -m ccomm.bench_header " + " ".join(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()
    md = to_markdown(cpu_costs(), transport_costs(repeats=args.repeats), command.strip(), args.repeats, load)
    old = args.out.read_text() if args.out.is_file() else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_splice(old, md))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
