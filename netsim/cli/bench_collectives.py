"""Collectives benchmark: ccomm's ``algo="auto"`` against the ring under ``netsim.emulate``.

Run as ``python -m ccomm.bench --collectives [--quick] [--out FILE]`` (or
``python -m netsim.cli.bench_collectives``). For every cell (payload bytes per rank x ranks x
one-way latency x bandwidth):

1. n local gloo ranks (`ccomm.ranks.RankPool`) enter ``netsim.emulate(Link(mbps, ms),
   clock="virtual")``. The virtual clock never sleeps: it advances to each operation's
   modeled due time, or by the real wall time when the transport or the Python between
   rounds took longer (it charges max(real, modeled), like the wall clock, but without
   waiting out 75 ms latencies), so a cell takes seconds.
2. Every rank records the emulated link as its group's measured link
   (``ccomm.comm.set_measured``), which is what ``auto`` decides from.
3. One untimed ring all-gather; then for each repeat and algorithm (``ring``, ``auto``,
   and in the 64 MiB row the forced log-depth one, interleaved): an emulated barrier lines
   the ranks' clocks up, then one ``allgather_payloads`` is timed on the virtual clock. A
   repeat's time is the slowest rank's; the table shows the median over repeats, next to
   the alpha-beta model of the algorithm that ran (`ccomm.schedule`).

Ring and auto of a cell run in the same emulation, interleaved, so their ratio is measured
side by side. Where a time is far above its model, the run measured the host (loopback
transport, Python, scheduling on a busy machine), not the emulated link.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ccomm.bench import publish

__all__ = ["Cell", "Result", "GRID", "TARGET_CELLS", "QUICK_GRID", "run", "to_markdown", "main"]

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class Cell:
    """One benchmark point; ``same_size=False`` gives rank r a block of (r+1)/n x nbytes."""

    n: int
    nbytes: int
    latency_ms: float
    mbps: float
    same_size: bool = True
    algos: tuple[str, ...] = ("ring", "auto")
    repeats: int = 3
    note: str = ""


@dataclass(frozen=True)
class Result:
    cell: Cell
    #: algo -> median seconds (slowest rank), what auto chose, model seconds of what ran.
    seconds: dict[str, float] = field(default_factory=dict)
    chosen: dict[str, str] = field(default_factory=dict)
    model: dict[str, float] = field(default_factory=dict)


GRID: tuple[Cell, ...] = tuple(
    Cell(n, nbytes, lat, 100.0)
    for n in (4, 8)
    for nbytes in (1 * KIB, 64 * KIB, 1 * MIB)
    for lat in (0.1, 10.0, 75.0)
)
#: The issue's targets: 64 KiB among 8 ranks at 75 ms / 100 Mbit/s (auto >= 2x faster),
#: the same with sizes unknown in advance, and 64 MiB at 0.1 ms / 1 Gbit/s (auto <= 1.05x ring).
#: The 64 KiB rows take 7 repeats: on a busy host the Python rounds of log-depth are the more
#: exposed to scheduling delays, and the median of 7 is steadier than of 3.
TARGET_CELLS: tuple[Cell, ...] = (
    Cell(8, 64 * KIB, 75.0, 100.0, repeats=7, note="target: auto >= 2x faster"),
    Cell(8, 64 * KIB, 75.0, 100.0, same_size=False, repeats=7, note="sizes unknown in advance"),
    Cell(8, 64 * MIB, 0.1, 1000.0, algos=("ring", "auto", "doubling"), repeats=1,
         note="target: auto <= 1.05x ring"),
)
QUICK_GRID: tuple[Cell, ...] = (Cell(4, 64 * KIB, 75.0, 100.0), Cell(4, 1 * MIB, 0.1, 100.0))


def _sizes(cell: Cell) -> list[int]:
    """Bytes of each rank's block (multiples of 4: fp32 elements)."""
    if cell.same_size:
        return [cell.nbytes] * cell.n
    return [cell.nbytes * (r + 1) // cell.n // 4 * 4 for r in range(cell.n)]


def _rank_job(rank: int, n: int, cells: Sequence[Cell]) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    from ccomm import Payload, PayloadMeta
    from ccomm.comm import allgather_payloads, clear_measured, set_measured
    from ccomm.stats import CommStats
    from netsim.emulation import emulate
    from netsim.model.link import Link

    out = []
    for cell in cells:
        link = Link(cell.mbps, cell.latency_ms)
        x = torch.ones(_sizes(cell)[rank] // 4)
        # One tensor shape on every rank (the wire header checks it; sizes may differ). The
        # calls run unchecked (check=False): the model's "sizes known" cells have no header step.
        p = Payload(x, PayloadMeta(torch.Size([max(_sizes(cell)) // 4]), x.dtype))
        times: dict[str, list[float]] = {}
        chosen: dict[str, str] = {}
        with emulate(link, clock="virtual") as emu:
            set_measured(None, link.latency_s, cell.mbps * 1e6 / 8)
            try:
                # Untimed first call: buffers and connections are set up outside the timings.
                allgather_payloads(p, same_size=cell.same_size, algo="ring", check=False)
                # Algorithms interleaved repeat by repeat, so drifting machine load hits each alike.
                for _ in range(cell.repeats):
                    for algo in cell.algos:
                        dist.barrier()
                        st = CommStats()
                        t0 = emu.now()
                        allgather_payloads(p, same_size=cell.same_size, algo=algo, check=False, stats=st)
                        times.setdefault(algo, []).append(emu.now() - t0)
                        ((_, ran),) = st.by_algo()
                        chosen[algo] = ran
            finally:
                clear_measured(None)
        out.append({"times": times, "chosen": chosen})
    return out


def _model(cell: Cell, algo: str) -> float:
    from netsim.model import cost
    from netsim.model.link import Link
    from netsim.model.topo import Topo

    sizes = [float(s) for s in _sizes(cell)]
    steps = cost.schedule("allgather", cell.n, max(sizes), algo, sizes=sizes, sizes_known=cell.same_size)
    return cost.schedule_time(Topo(cell.n, Link(cell.mbps, cell.latency_ms)), steps)


def run(cells: Sequence[Cell], progress: bool = True) -> list[Result]:
    """Every cell, grouped by n so each group size starts one pool of ranks."""
    from ccomm.ranks import RankPool

    results: dict[int, Result] = {}
    for n in sorted({c.n for c in cells}):
        idx = [i for i, c in enumerate(cells) if c.n == n]
        with RankPool(n, group_timeout_s=300.0, name="ccomm-bench-coll") as pool:
            for i in idx:
                cell = cells[i]
                if progress:
                    print(f"n={n} {cell.nbytes} B {cell.latency_ms} ms {cell.mbps} Mbit/s same_size={cell.same_size}",
                          file=sys.stderr)
                per_rank = pool.run(_rank_job, [cell], timeout=1800.0)
                res = Result(cell)
                for algo in cell.algos:
                    reps = [max(r[0]["times"][algo][k] for r in per_rank) for k in range(cell.repeats)]
                    res.seconds[algo] = statistics.median(reps)
                    ran = {r[0]["chosen"][algo] for r in per_rank}
                    if len(ran) != 1:
                        raise RuntimeError(f"ranks chose different algorithms for {cell}: {ran}")
                    res.chosen[algo] = ran.pop()
                    res.model[algo] = _model(cell, res.chosen[algo])
                results[i] = res
    return [results[i] for i in range(len(cells))]


def _fmt_bytes(b: int) -> str:
    for unit, size in (("MiB", MIB), ("KiB", KIB)):
        if b >= size and b % size == 0:
            return f"{b // size} {unit}"
    return f"{b} B"


def _row(r: Result) -> str:
    c = r.cell
    ring, auto = r.seconds["ring"], r.seconds["auto"]
    extra = "; ".join(f"{a}: {r.seconds[a] * 1e3:.1f} ms" for a in c.algos if a not in ("ring", "auto"))
    return (f"| {c.n} | {_fmt_bytes(c.nbytes)}{'' if c.same_size else ' (varied)'} | {c.latency_ms:g} | {c.mbps:g} "
            f"| {ring * 1e3:.1f} ({r.model['ring'] * 1e3:.1f}) | {auto * 1e3:.1f} ({r.model['auto'] * 1e3:.1f}) "
            f"| {r.chosen['auto']} | {ring / auto:.2f}x | {extra or c.note} |")


def to_markdown(results: Sequence[Result], command: str, load: tuple[float, float] | None = None) -> str:
    head = [
        "# ccomm collectives: ring vs `algo=\"auto\"` under netsim.emulate",
        "",
        f"Generated by `{command}` on {_dt.date.today().isoformat()} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch gloo, n local ranks). All-gather of fp32 payloads "
        "(`ccomm.comm.allgather_payloads`) over `netsim.emulate(Link(Mbit/s, ms), clock=\"virtual\")`: "
        "the virtual clock charges max(real, modeled) time without sleeping. Times are the slowest "
        "rank's, median over repeats (3; 7 in the 64 KiB target rows; 1 for 64 MiB); in brackets the alpha-beta model "
        "(`ccomm.schedule`, equal to `netsim.model.cost.schedule_time`) of the algorithm that ran. "
        "`auto` decides from the link recorded with `ccomm.comm.set_measured` (the emulated one)."
        + ("" if load is None else f" Host load (1-minute average) at start / end: {load[0]:.1f} / {load[1]:.1f}."),
        "",
        "| n | bytes per rank | latency ms | Mbit/s | ring ms (model) | auto ms (model) | auto ran | ring / auto | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    body = [_row(r) for r in results]
    notes = ["", "## Targets", ""]
    for r in results:
        c = r.cell
        ratio = r.seconds["ring"] / r.seconds["auto"]
        if c.note.startswith("target: auto >= 2x"):
            notes.append(f"- 64 KiB, 8 ranks, 75 ms, 100 Mbit/s: ring / auto = {ratio:.2f}x "
                         f"({'met' if ratio >= 2.0 else 'NOT met'}, target >= 2x).")
        if c.note.startswith("target: auto <= 1.05x"):
            slow = r.seconds["auto"] / r.seconds["ring"]
            host = r.seconds["ring"] > 1.05 * r.model["ring"] + 2e-3
            notes.append(
                f"- 64 MiB, 8 ranks, 0.1 ms, 1 Gbit/s: auto / ring = {slow:.3f} measured "
                f"({'within' if slow <= 1.05 else 'outside'} the target <= 1.05); auto ran `{r.chosen['auto']}` "
                f"(model: ring {r.model['ring'] * 1e3:.1f} ms, "
                + ", ".join(f"{a} {r.model[a] * 1e3:.1f} ms" for a in c.algos[2:])
                + f"; auto keeps the ring when log-depth saves less than 5 %). Measured forced log-depth: "
                + ", ".join(f"{a} {r.seconds[a] / r.seconds['ring']:.3f}x ring" for a in c.algos[2:]) + "."
                + (f" The ring took {r.seconds['ring'] / r.model['ring']:.1f}x its model: this row measured "
                   "this host's loopback transport of 8 x 448 MiB, not the emulated link, so it cannot check "
                   "the 5 % target; what holds it is the choice: when auto runs the ring it is the same call."
                   if host else ""))
    return "\n".join(head + body + notes) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ccomm.bench --collectives", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small cells only (a smoke run)")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks/collectives.md"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cells = QUICK_GRID if args.quick else GRID + TARGET_CELLS
    load_start = os.getloadavg()[0]
    results = run(cells, progress=not args.no_progress)
    load = (load_start, os.getloadavg()[0])
    command = "python -m ccomm.bench --collectives " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(to_markdown(results, command.strip(), load), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
