"""``probe(net)``: measure what an OS-level net really gives and compare with its link
(docs/design/netsim.md#probe).

* **RTT**: TCP ping-pong of 32-byte messages with TCP_NODELAY; the median must be within
  ``RTT_TOL_ABS_S + RTT_TOL_REL * configured``, configured = ``lat_ij + lat_ji`` (an idle
  htb bucket lets a small message through without serialization delay).
* **Bandwidth**: one TCP connection carries ``max(8 MiB, 3 s x rate)`` after ``OMIT_BDPS``
  bandwidth-delay products (or ``nbytes`` in all); goodput is timed at the receiver from the
  omit mark to the last byte (iperf's ``--omit``: slow start and window autotuning are not the
  link) and must be within ``BW_TOL``.  The whole-transfer goodput is reported beside it.
  With ``duplex`` both directions run at once and each must pass.  For trace-driven links the
  completion time (sender's first write to receiver's last byte) is compared with
  ``transfer_time(S, start)`` instead.  Under loss the goodput is informational (reported,
  not judged): the wire's counters show the drops.
* **gloo** (``gloo=True``): send, all-reduce and all-gather of 4 MiB among all hosts against
  :mod:`netsim.model.cost`; p2p within ``P2P_TOL``, collectives within ``GLOO_TOL``.

Tolerances are named constants, four times tighter than Mininet's ±20 % self-test.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
from typing import Any

from netsim.namespaces.netns import Net
from netsim.probe.report import (BW_TOL, GLOO_TOL, OMIT_BDPS, P2P_TOL, RTT_TOL_ABS_S, RTT_TOL_REL, GlooResult,
                                 PairResult, ProbeReport)

__all__ = ["probe", "probe_gloo"]

log = logging.getLogger(__name__)

_PORT = 5201
_MIN_BULK = 8 << 20
_MIN_OMIT = 256 << 10
_BULK_SECONDS = 3.0
_AGENT_TIMEOUT_S = 300.0


def _agent(net: Net, rank: int, *args: str, port: int = 29500) -> subprocess.Popen[str]:
    return net.popen(rank, [sys.executable, "-m", "netsim.probe.agent", *args],
                     stdout=subprocess.PIPE, text=True, port=port)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=_AGENT_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"probe agent exited {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def _pairs(n: int, pairs: str) -> list[tuple[int, int]]:
    if pairs == "ring":
        return [(0, 1)] if n == 2 else [(i, (i + 1) % n) for i in range(n)]
    if pairs == "all":
        return [(i, j) for i in range(n) for j in range(n) if i != j]
    raise ValueError(f"pairs must be 'ring' or 'all', got {pairs!r}")


def probe(net: Net, pairs: str = "ring", *, samples: int = 200, warmup: int = 20,
          nbytes: int | None = None, duplex: bool = True, gloo: bool = False) -> ProbeReport:
    """Measure RTT and goodput for each pair of ``net`` (and gloo collectives with ``gloo``)."""
    if samples < 1 or warmup < 0:
        raise ValueError(f"samples must be >= 1 and warmup >= 0, got {samples}, {warmup}")
    topo, n = net.topo, len(net.hosts)
    servers = [_agent(net, r, "serve", net.hosts[r].addr, str(_PORT)) for r in range(n)]
    try:
        for s in servers:
            assert s.stdout is not None
            if not s.stdout.readline():
                raise RuntimeError("probe server failed to start")
        results = [_probe_pair(net, i, j, samples, warmup, nbytes, duplex)
                   for i, j in _pairs(n, pairs)]
    finally:
        for s in servers:
            s.kill()
            s.communicate()
    glo = tuple(probe_gloo(net)) if gloo else ()
    return ProbeReport(tuple(results), glo, net.wire_counters())


def _probe_pair(net: Net, i: int, j: int, samples: int, warmup: int, nbytes: int | None,
                duplex: bool) -> PairResult:
    topo = net.topo
    trace_ij, trace_ji = topo.message_trace(i, j), topo.message_trace(j, i)
    constant = len(trace_ij.times_s) == 1 and not trace_ij.loop
    rate_ij, rate_ji = trace_ij.rate_mbps(0.0) * 1e6, trace_ji.rate_mbps(0.0) * 1e6
    rtt_cfg = topo.pair_link(i, j).latency_s + topo.pair_link(j, i).latency_s
    rtts = _result(_agent(net, i, "rtt", net.hosts[j].addr, str(_PORT), "--samples",
                          str(samples), "--warmup", str(warmup)))["rtt"]
    med = statistics.median(rtts)
    rtt_ok = abs(med - rtt_cfg) <= RTT_TOL_ABS_S + RTT_TOL_REL * rtt_cfg
    jit = topo.pair_link(i, j).jitter_s + topo.pair_link(j, i).jitter_s
    if jit > 0:  # the extremes must stay inside the jitter window (+ 1 ms of slack)
        rtt_ok = rtt_ok and all(abs(r - rtt_cfg) <= 2 * jit + RTT_TOL_ABS_S for r in rtts)
    # Time the steady state after OMIT_BDPS bandwidth-delay products (iperf's --omit): slow
    # start and receive-window autotuning take a few RTTs that the model's open window omits.
    bdp = trace_ij.mean_mbps() * 1e6 / 8 * rtt_cfg
    steady = max(_MIN_BULK, math.ceil(_BULK_SECONDS * trace_ij.mean_mbps() * 1e6 / 8))
    omit = max(_MIN_OMIT, math.ceil(OMIT_BDPS * bdp)) if constant else 0
    size = nbytes or steady + omit
    omit = min(omit, size // 2)
    sargs = ("--bytes", str(size), "--omit", str(omit))
    one = _result(_agent(net, i, "send", net.hosts[j].addr, str(_PORT), *sargs))
    goodput = _goodput(one)
    completion = one["last"] - one["start"]
    model = topo.transfer_time(i, j, size, max(0.0, one["start"] - net.t0))
    lossy = topo.pair_link(i, j).loss > 0 or topo.pair_link(j, i).loss > 0
    if constant:
        cfg: float | None = rate_ij / 1e6
        # Under loss the goodput is informational (docs/design/netsim.md#probe): TCP, not the link, sets it.
        bw_ok = lossy or abs(goodput / cfg - 1) <= BW_TOL
    else:
        cfg = None
        bw_ok = abs(completion / model - 1) <= BW_TOL
    dup, dup_ok = None, True
    if duplex:
        a = _agent(net, i, "send", net.hosts[j].addr, str(_PORT), *sargs)
        b = _agent(net, j, "send", net.hosts[i].addr, str(_PORT), *sargs)
        ra, rb = _result(a), _result(b)
        dup = (_goodput(ra), _goodput(rb))
        if constant and not lossy:
            dup_ok = (abs(dup[0] / (rate_ij / 1e6) - 1) <= BW_TOL
                      and abs(dup[1] / (rate_ji / 1e6) - 1) <= BW_TOL)
    return PairResult(i, j, rtt_cfg, med, min(rtts), max(rtts), rtt_ok, cfg, goodput, bw_ok,
                      completion, model, dup, dup_ok, _goodput(one, whole=True))


def _goodput(r: dict[str, float], whole: bool = False) -> float:
    """Receiver-timed Mbit/s from the omit mark (or, ``whole``, the first byte) to the last."""
    t0, n0 = (r["first"], r["first_bytes"]) if whole else (r["mark"], r["mark_bytes"])
    return 8 * (r["bytes"] - n0) / (r["last"] - t0) / 1e6


def probe_gloo(net: Net, nbytes: int = 4 << 20, iters: int = 3,
               ops: tuple[str, ...] = ("send", "allreduce", "allgather")) -> list[GlooResult]:
    """Run each op on real gloo ranks in the namespaces; median of ``iters`` against cost.py."""
    from netsim.model import cost

    n = len(net.hosts)
    out = []
    for k, op in enumerate(ops):
        # MASTER_PORT differs per op so a lingering TIME_WAIT store cannot collide.
        procs = [_agent(net, r, "gloo", op, "--bytes", str(nbytes), "--iters", str(iters),
                        port=29500 + k) for r in range(n)]
        res = [_result(p) for p in procs]
        measured = statistics.median(res[0]["times"])
        if op == "send":
            model, tol = cost.p2p_time(nbytes, net.topo, src=0, dst=1), P2P_TOL
        elif op == "allreduce":
            model, tol = cost.allreduce_time(nbytes, net.topo, n=n, algo="ring"), GLOO_TOL
        else:
            model, tol = cost.allgather_time(nbytes, net.topo, n=n, algo="ring"), GLOO_TOL
        out.append(GlooResult(op, n, nbytes, measured, model, tol))
        log.info("gloo %s: %.3f s vs %.3f s", op, measured, model)
    return out
