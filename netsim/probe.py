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
  :mod:`netsim.cost`; p2p within ``P2P_TOL``, collectives within ``GLOO_TOL``.

Tolerances are named constants, four times tighter than Mininet's ±20 % self-test.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from netsim.netns import Net

__all__ = ["add_cli", "BW_TOL", "OMIT_BDPS", "GLOO_TOL", "P2P_TOL", "RTT_TOL_ABS_S", "RTT_TOL_REL", "GlooResult",
           "PairResult", "ProbeReport", "probe", "probe_gloo"]

log = logging.getLogger(__name__)

BW_TOL = 0.05
RTT_TOL_ABS_S = 1e-3
RTT_TOL_REL = 0.02
P2P_TOL = 0.05
GLOO_TOL = 0.10
_PORT = 5201
_MIN_BULK = 8 << 20
_MIN_OMIT = 256 << 10
#: Bandwidth-delay products sent before the goodput clock starts.
OMIT_BDPS = 8
_BULK_SECONDS = 3.0
_AGENT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class PairResult:
    src: int
    dst: int
    rtt_config_s: float
    rtt_median_s: float
    rtt_min_s: float
    rtt_max_s: float
    rtt_ok: bool
    bw_config_mbps: float | None
    bw_mbps: float
    bw_ok: bool
    completion_s: float
    model_s: float
    duplex_mbps: tuple[float, float] | None = None
    duplex_ok: bool = True
    bw_whole_mbps: float = math.nan  # from the first byte, slow start included

    @property
    def ok(self) -> bool:
        return self.rtt_ok and self.bw_ok and self.duplex_ok


@dataclass(frozen=True)
class GlooResult:
    op: str
    n: int
    nbytes: int
    measured_s: float
    model_s: float
    tol: float

    @property
    def ratio(self) -> float:
        return self.measured_s / self.model_s

    @property
    def ok(self) -> bool:
        return abs(self.ratio - 1.0) <= self.tol


@dataclass(frozen=True)
class ProbeReport:
    pairs: tuple[PairResult, ...]
    gloo: tuple[GlooResult, ...] = ()
    wire: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default=())
    #: Emulate backend only: operations whose real transport finished after their modeled
    #: time, summed over the ranks (``emu.stats.late_ops``); those measured the host, not the link.
    late_ops: int | None = None

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.pairs) and all(g.ok for g in self.gloo)

    def table(self) -> str:
        """Configured beside measured, one row per pair (and per gloo op)."""
        rows = ["pair    rtt cfg ms  rtt med ms  [min, max]          bw cfg Mbit/s  bw Mbit/s"
                "  duplex Mbit/s  whole Mbit/s  ok"]
        for p in self.pairs:
            cfg = f"{p.bw_config_mbps:.2f}" if p.bw_config_mbps is not None else "trace"
            dup = "-" if p.duplex_mbps is None else "%.2f/%.2f" % p.duplex_mbps
            rows.append(f"{p.src}->{p.dst}  {p.rtt_config_s * 1e3:10.3f}  "
                        f"{p.rtt_median_s * 1e3:10.3f}  [{p.rtt_min_s * 1e3:.2f}, "
                        f"{p.rtt_max_s * 1e3:.2f}]  {cfg:>13}  {p.bw_mbps:9.2f}  {dup:>13}  "
                        f"{p.bw_whole_mbps:12.2f}  {'yes' if p.ok else 'NO'}")
        for g in self.gloo:
            rows.append(f"gloo {g.op} n={g.n} {g.nbytes} B: {g.measured_s:.3f} s vs model "
                        f"{g.model_s:.3f} s (x{g.ratio:.3f}, tol {g.tol:.0%}) "
                        f"{'yes' if g.ok else 'NO'}")
        if self.late_ops:
            rows.append(f"emulate: {self.late_ops} operation(s) finished after their modeled time "
                        "(the host did not keep up; those measurements are of the host)")
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "pairs": [vars(p) for p in self.pairs],
                "gloo": [{**vars(g), "ratio": g.ratio, "ok": g.ok} for g in self.gloo],
                "wire": self.wire, "notes": list(self.notes), "late_ops": self.late_ops}


def _agent(net: Net, rank: int, *args: str, port: int = 29500) -> subprocess.Popen[str]:
    return net.popen(rank, [sys.executable, "-m", "netsim.probe_agent", *args],
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
    from netsim import cost

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


def _cmd_probe(args: argparse.Namespace) -> int:
    from netsim import netns
    from netsim.cli import EXIT_NO_ROOT, EXIT_TOLERANCE, topo_from_args

    if args.backend == "emulate":
        from netsim.probe_emulate import probe_emulate

        try:
            topo = topo_from_args(args)
        except ValueError as e:
            print(f"netsim: {e}", file=sys.stderr)
            return 2
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
            net = netns.bring_up(args, topo_from_args(args), persist=False)
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
    from netsim.cli import add_link_args, parse_size

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
