"""Real-time runs over real network namespaces (`netsim.namespaces.netns`, root): the virtual clock
checked against the kernel's TCP stack and gloo's own collectives (docs/design/deco_sgd.md#real-time-validation).

`run_netns(runs)` takes (spec, replayed method) pairs that share n and the link:

1. brings up `Topo(n, link)` with `netsim.namespaces.netns.up` (a fresh tag; where the kernel has no
   netem the userspace delay wire adds the latency) -- one net for all runs, torn down on
   leaving, on an error and on SIGTERM/SIGINT (netns's guards);
2. starts one worker per host inside its namespace (``python -m deco_sgd.bench.realtime_netns``
   with `Net.env`: gloo pinned to the shaped device, env:// rendezvous on host 0) and waits
   for all of them, at most `deadline_s`;
3. each worker joins one gloo group, opens its TCP windows with a few untimed bulk
   collectives (`_open_windows`) and runs the specs in order through `realtime.train_rank`.
   Nothing is emulated: DeCo-SGD's data exchanges use the caller's (default) group and its
   control exchanges `DecoState`'s own gloo group, and both cross the shaped link, as on a
   cluster. A run with a replayed method replays the decision log that method produced in
   the same worker;
4. measures, per run, how far the host fell behind (`realtime.late_bound_s`): the time the
   delay wire was stalled (the union of its intervals of packets over 1 ms late,
   `late_intervals` in its counters) within the run's timed window, plus `transport_late_s`:
   the mean run-queue wait per wake-up of each rank's transport threads (every thread but the
   main one, from ``/proc/self/task/*/schedstat``) times gloo's message steps it ran. The main
   thread's own delays are in the measured compute and host times, which the replay uses.
   A starved I/O thread mostly does not slow a transfer (the kernel receives and
   acknowledges into the socket buffer meanwhile); it delays each hop's hand-over.

The result is a `RealResult` per run with `backend="netns"`, checked by `realtime.validate`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .realtime import RealResult, RealRunSpec, train_rank
from .vclock import pattern_cost

__all__ = ["run_netns", "stall_time", "transport_lag", "transport_late_s", "transport_wait", "gloo_steps", "worker_main"]

#: Import torch, load the task and join the group in every namespace, on a busy machine.
START_S = 120.0
#: How long the counters file may lag behind (the wire rewrites it once a second).
_COUNTERS_LAG_S = 1.2


def stall_time(intervals: Sequence[Sequence[float]], start: float, end: float) -> float:
    """Length of the union of `intervals` ([a, b] pairs, sorted by a) clipped to [start, end]."""
    total, reach = 0.0, start
    for a, b in intervals:
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def transport_wait() -> dict[int, tuple[int, int]]:
    """Per thread other than the main one: cumulative run-queue wait (ns) and wake-ups, from
    schedstat: how long the transport (gloo's I/O loop and workers) was runnable without a
    CPU. `transport_lag` turns two of these into a mean wait per wake-up."""
    pid = os.getpid()
    out: dict[int, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        try:
            f = (task / "schedstat").read_text().split()
            out[int(task.name)] = (int(f[1]), int(f[2]))
        except (FileNotFoundError, IndexError, ValueError):  # the thread exited meanwhile
            continue
    return out


def transport_lag(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> tuple[float, int]:
    """Run-queue wait (s) and wake-ups between two `transport_wait` snapshots, counting only
    what happened in between (a thread that exited meanwhile is left out, a new one counts
    whole)."""
    wait = slices = 0
    for tid, (w, n) in after.items():
        w0, n0 = before.get(tid, (0, 0))
        wait, slices = wait + w - w0, slices + n - n0
    return wait / 1e9, slices


def gloo_steps(collective: str, world: int) -> int:
    """Transport hand-offs of one gloo collective that hold its next message back: an
    all-reduce splits its buffer into at least 2n segments and runs 2n - 2 message steps in
    each of its two phases (gloo/allreduce.cc); an all-gather passes whole blocks, n - 1
    steps. Each step waits for two wake-ups of an I/O thread: the sender's, which reads the
    receiver's "recv ready" notice and only then writes the message (gloo's rendezvous,
    `netsim.model.gloo`), and the receiver's, which reads the message."""
    steps = 2 * (2 * world - 2) if collective == "allreduce" else pattern_cost(collective, world, 0.0).hops
    return 2 * steps


def transport_late_s(rec: dict[str, Any], world: int) -> float:
    """The transport's share of `late_bound_s` for one rank record: its mean run-queue wait
    per wake-up times the message steps (`gloo_steps`) of every exchange the rank launched."""
    steps = sum(gloo_steps(u["collective"], world) for s in rec["steps"] for u in s["units"])
    return rec["netns"]["transport_lag_s"] * steps


def _runs_json(runs: Sequence[tuple[RealRunSpec, str | None]]) -> list[dict[str, Any]]:
    return [{"spec": spec.to_dict(), "replay": replay} for spec, replay in runs]


def _open_windows(world: int, nbytes: int = 1 << 20, rounds: int = 3) -> None:
    """Untimed bulk collectives on the default group, so its (long-lived) TCP connections have
    left slow start before the first timed step: the link model assumes an open window, and
    `netsim.namespaces.netns` disables slow start after idle, so the window stays open between steps."""
    import torch
    import torch.distributed as dist

    x = torch.zeros(nbytes // 4)
    for _ in range(rounds):
        dist.all_reduce(x)
        dist.all_gather([torch.empty_like(x) for _ in range(world)], x)


def worker_main(runs_file: str, out_dir: str) -> None:
    """One host's worker: join the group (env://) and run every spec; writes rank<r>.json."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    runs = json.loads(Path(runs_file).read_text())
    specs = [(RealRunSpec(**r["spec"]), r["replay"]) for r in runs]  # the spec validates its lists
    torch.set_num_threads(1)  # ranks stand in for separate machines on a few shared cores
    dist.init_process_group("gloo", timeout=timedelta(seconds=max(s.timeout_s for s, _ in specs)))
    rank, world = dist.get_rank(), dist.get_world_size()
    _open_windows(world)
    t0_trace = float(os.environ["NETSIM_T0"])
    logs: dict[str, list[dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    by_name = {s.name: s for s, _ in specs}
    for spec, replay in specs:
        if replay is not None:
            spec = spec.replaying(by_name[replay], logs[replay])
        before = transport_wait()
        rec = train_rank(rank, world, spec, group=None, control_group=None,
                         trace_now=lambda: time.monotonic() - t0_trace)
        wait, slices = transport_lag(before, transport_wait())
        rec["netns"] = {"transport_wait_s": wait, "transport_wakeups": slices,
                        "transport_lag_s": wait / max(1, slices)}
        rec["decisions_used"] = [list(d) for d in spec.decisions]
        logs[spec.name] = rec["decisions"]
        out.append(rec)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


def run_netns(runs: Sequence[tuple[RealRunSpec, str | None]], *, tag: str | None = None,
              deadline_s: float | None = None) -> list[RealResult]:
    """Run `runs` on real namespaces (blocking; root; see the module docstring)."""
    from netsim import Topo
    from netsim.namespaces import netns

    if not runs:
        raise ValueError("runs: give at least one (spec, replay) pair")
    first = runs[0][0]
    for spec, _ in runs[1:]:
        if spec.n != first.n or spec.link() != first.link():
            raise ValueError(f"runs: all runs share one net; {spec.name!r} has n={spec.n}, link {spec.link()} "
                             f"but {first.name!r} has n={first.n}, link {first.link()}")
    deadline_s = START_S + sum(s.timeout_s for s, _ in runs) if deadline_s is None else deadline_s
    tag = tag or f"rt{os.getpid() % 1_000_000}"
    with tempfile.TemporaryDirectory(prefix="deco-netns-") as tmp, \
            netns.up(Topo(first.n, first.link()), tag=tag) as net:
        d = Path(tmp)
        os.chmod(d, 0o755)
        (d / "runs.json").write_text(json.dumps(_runs_json(runs)))
        argv = [sys.executable, "-m", "deco_sgd.bench.realtime_netns", str(d / "runs.json"), str(d)]
        procs = []
        for r in range(first.n):
            with open(d / f"rank{r}.log", "w") as log:
                procs.append(net.popen(r, argv, stdout=log, stderr=subprocess.STDOUT))
        end = time.monotonic() + deadline_s
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.monotonic() > end:
                what = f"rank {failed[0]} exited {procs[failed[0]].returncode}" if failed else \
                    f"ranks {[r for r, p in enumerate(procs) if p.poll() is None]} still running after {deadline_s:.0f} s"
                r = failed[0] if failed else 0
                raise RuntimeError(f"realtime netns: {what}; rank {r} output:\n{_tail(d / f'rank{r}.log')}")
            time.sleep(0.1)
        bad = [r for r, p in enumerate(procs) if p.returncode != 0]
        if bad:
            raise RuntimeError(f"realtime netns: rank {bad[0]} exited {procs[bad[0]].returncode}; output:\n"
                               f"{_tail(d / f'rank{bad[0]}.log')}")
        time.sleep(_COUNTERS_LAG_S)  # the wire's counters cover the end of the last run
        wire = net.wire_counters() or {}
        ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(first.n)]
    results = []
    for k, (spec, _) in enumerate(runs):
        recs = [ranks[r][k] for r in range(first.n)]
        used = recs[0].pop("decisions_used")
        for rec in recs[1:]:
            rec.pop("decisions_used")
        spec = RealRunSpec(**{**spec.to_dict(), "decisions": used})
        start, stop = min(r["t0"] for r in recs), max(r["t_end"] for r in recs)
        stalled = stall_time(wire.get("late_intervals", []), start, stop)
        for rec in recs:
            rec["netns"].update(wire_stall_s=stalled, late_s=stalled + transport_late_s(rec, first.n),
                                wire_late_fraction=wire.get("late_over_1ms_fraction"), tag=tag)
        results.append(RealResult(spec, recs, backend="netns"))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deco_sgd.bench.realtime_netns",
                                 description="worker of `run_netns` (started inside a namespace)")
    ap.add_argument("runs", help="runs.json written by run_netns")
    ap.add_argument("out", help="directory for rank<r>.json")
    args = ap.parse_args(argv)
    worker_main(args.runs, args.out)
    return 0


if __name__ == "__main__":
    code = main()
    # The worker's results are written and its group destroyed: nothing is left that needs
    # the interpreter's finalization, and skipping it closes the exit race in which one of
    # gloo's worker threads, freeing a Work while Python finalizes, aborts the process
    # ("terminate called without an active exception", seen on a loaded host in CI's timing
    # run even with `ccomm.exitguard`). Streams are flushed first: os._exit does not.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
