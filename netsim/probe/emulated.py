"""``probe_emulate(topo)``: the probe's measurements on the in-process backend (no root).

The same questions as :func:`netsim.probe.probe` asks of a namespace net, asked of
:func:`netsim.emulate` on n local gloo processes:

1. **RTT**: rank 0 and rank 1 ping-pong a 32-byte tensor; the median must match
   ``transfer_time(32)`` there and back.
2. **Goodput**: rank 0 sends ``nbytes`` and rank 1 answers with 4 bytes; goodput is
   nbytes over the round trip minus the two latencies.
3. **Collectives**: all-reduce and all-gather of ``nbytes`` among all ranks, each started
   at an instant agreed over a plain (unshaped) gloo group, against :mod:`netsim.model.cost`.
Every comparison uses emulate's accuracy target, max(5 %, 2 ms) of the model.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from netsim.probe.report import GlooResult, PairResult, ProbeReport
from netsim.model.topo import Topo

if TYPE_CHECKING:
    from ccomm.ranks import RankPool

__all__ = ["EMU_TOL_REL", "EMU_TOL_ABS_S", "probe_emulate"]

EMU_TOL_REL = 0.05
EMU_TOL_ABS_S = 2e-3
_SMALL_BYTES = 32
_START_AHEAD_S = 0.05
_TIMEOUT_S = 300.0


def _tol_s(model_s: float) -> float:
    return max(EMU_TOL_REL * model_s, EMU_TOL_ABS_S)


def _aligned(plain: Any, rank: int) -> float:
    """Agree on a start instant over the unshaped group and sleep until it (one host: one clock)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([time.monotonic() + _START_AHEAD_S], dtype=torch.float64)
    dist.broadcast(t, 0, group=plain)
    start = float(t)
    time.sleep(max(0.0, start - time.monotonic()))
    return start


def _parts(topo: Topo) -> tuple[Any, ...]:
    """Topo as picklable pieces (its mappings are read-only proxies, which do not pickle)."""
    return topo.n, topo.link, dict(topo.hosts), dict(topo.pairs), topo.shared


def _rank_job(rank: int, n: int, parts: tuple[Any, ...], nbytes: int, samples: int) -> dict[str, Any]:
    """One rank's measurements, run by `ccomm.ranks.run_ranks` (which owns the default group)."""
    import torch
    import torch.distributed as dist

    from netsim.emulation import emulate

    topo = Topo(parts[0], parts[1], hosts=parts[2], pairs=parts[3], shared=parts[4])
    plain = dist.new_group(backend="gloo")  # made before emulate: never shaped
    res: dict[str, Any] = {"rtt": [], "bulk": None, "allreduce": None, "allgather": None}
    with emulate(topo) as emu:
        small, ack = torch.zeros(_SMALL_BYTES // 4), torch.zeros(1)
        for _ in range(samples):
            t0 = _aligned(plain, rank)
            if rank == 0:
                dist.send(small, 1)
                dist.recv(small, 1)
                res["rtt"].append(time.monotonic() - t0)
            elif rank == 1:
                dist.recv(small, 0)
                dist.send(small, 0)
        bulk = torch.zeros(nbytes // 4)
        t0 = _aligned(plain, rank)
        if rank == 0:
            dist.send(bulk, 1)
            dist.recv(ack, 1)
            res["bulk"] = time.monotonic() - t0
        elif rank == 1:
            dist.recv(bulk, 0)
            dist.send(ack, 0)
        t0 = _aligned(plain, rank)
        dist.all_reduce(bulk)
        res["allreduce"] = time.monotonic() - t0
        gathered = [torch.empty_like(bulk) for _ in range(n)]
        t0 = _aligned(plain, rank)
        dist.all_gather(gathered, bulk)
        res["allgather"] = time.monotonic() - t0
        res["late_ops"] = emu.stats.late_ops
    return res


def probe_emulate(topo: Topo, *, nbytes: int = 1 << 20, samples: int = 20, pool: RankPool | None = None) -> ProbeReport:
    """Measure RTT, goodput and two collectives through ``netsim.emulate(topo)``.

    The ranks are started for the probe, or taken from ``pool`` (``topo.n`` ranks, e.g. to
    probe repeatedly without paying their start-up each time). A rank that fails raises
    ``ccomm.ranks.RankError``; ranks that overrun the deadline are killed and
    ``TimeoutError`` names them.
    """
    from ccomm.ranks import run_ranks
    from netsim.model import cost

    if topo.n < 2:
        raise ValueError(f"topo.n={topo.n}: the probe needs at least 2 ranks")
    if nbytes < 4 or samples < 1:
        raise ValueError(f"nbytes={nbytes} must be >= 4 and samples={samples} >= 1")
    if pool is not None and pool.n != topo.n:
        raise ValueError(f"pool: has {pool.n} ranks, topo.n={topo.n} needs as many")
    job = (_rank_job, topo.n, _parts(topo), nbytes, samples)
    if pool is None:
        results = run_ranks(*job, timeout=_TIMEOUT_S, group_timeout_s=_TIMEOUT_S)
    else:
        results = pool.run(job[0], *job[2:], timeout=_TIMEOUT_S)

    r0 = results[0]
    rtt_model = cost.p2p_time(_SMALL_BYTES, topo, 0, 1) + cost.p2p_time(_SMALL_BYTES, topo, 1, 0)
    rtt_med = statistics.median(r0["rtt"])
    lat = topo.pair_link(0, 1).latency_ms / 1e3 + topo.pair_link(1, 0).latency_ms / 1e3
    bulk_model = cost.p2p_time(nbytes, topo, 0, 1) + cost.p2p_time(4, topo, 1, 0)
    link = topo.pair_link(0, 1)
    pair = PairResult(
        src=0, dst=1, rtt_config_s=rtt_model, rtt_median_s=rtt_med, rtt_min_s=min(r0["rtt"]),
        rtt_max_s=max(r0["rtt"]), rtt_ok=abs(rtt_med - rtt_model) <= _tol_s(rtt_model),
        bw_config_mbps=link.bandwidth_mbps,
        bw_mbps=8 * nbytes / max(r0["bulk"] - lat, 1e-9) / 1e6,
        bw_ok=abs(r0["bulk"] - bulk_model) <= _tol_s(bulk_model),
        completion_s=r0["bulk"], model_s=bulk_model, bw_whole_mbps=8 * nbytes / r0["bulk"] / 1e6,
    )
    gloo = []
    for op, fn in (("allreduce", cost.allreduce_time), ("allgather", cost.allgather_time)):
        model = fn(nbytes, topo, n=topo.n, algo="ring")
        measured = max(res[op] for res in results)  # the op ends when its last rank does
        gloo.append(GlooResult(op, topo.n, nbytes, measured, model, _tol_s(model) / model))
    return ProbeReport((pair,), tuple(gloo), notes=("backend: emulate (in-process, wall clock)",),
                       late_ops=sum(res["late_ops"] for res in results))
