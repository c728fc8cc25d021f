"""netsim.emulate charges ccomm's log-depth collectives (point-to-point rounds) as the cost model does.

Each case runs in its own emulation with the virtual clock, every rank starting the call at
the same virtual instant, and is compared with ``netsim.model.cost.schedule_time`` of the schedule
``ccomm.schedule`` gives for it, within the emulate tests' max(5 %, 2 ms). The virtual clock
never sleeps, so the check does not depend on the machine's load; one wall-clock run
(marker ``timing``) checks that real sleeping agrees too.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mp import LazyRanks  # noqa: E402
from _timing import on_time  # noqa: E402

from ccomm import Payload, PayloadMeta  # noqa: E402
from ccomm.comm import allgather_payloads, allreduce_payload  # noqa: E402
from netsim import cost  # noqa: E402
from netsim.emulation import emulate  # noqa: E402
from netsim.model.link import Link  # noqa: E402
from netsim.model.topo import Topo  # noqa: E402

REL_TOL = 0.05
ABS_TOL_S = 2e-3
N = 4
#: The issue's high-latency link: 100 Mbit/s, 75 ms one way.
LINK = Link(100, 75)
NUMEL = 16_384  # 64 KiB of fp32
#: (op, algo, same_size): every log-depth pattern, and the ring through emulate's collective path.
CASES = [
    ("allgather", "ring", True),
    ("allgather", "doubling", True),
    ("allgather", "bruck", True),
    ("allgather", "bruck", False),
    ("allreduce", "doubling", True),
    ("allreduce", "tree", True),
]
START_S = 30.0  # virtual seconds, later than any rank's entry into emulate


def _numel(rank: int, same_size: bool) -> int:
    return NUMEL if same_size else NUMEL // 4 * (rank + 1)


def _model(op: str, algo: str, same_size: bool) -> float:
    topo = Topo(N, LINK)
    if op == "allgather":
        sizes = [4.0 * _numel(r, same_size) for r in range(N)]
        steps = cost.schedule(op, N, max(sizes), algo, sizes=sizes, sizes_known=same_size)
    else:
        steps = cost.schedule(op, N, 4.0 * NUMEL, algo)
    return cost.schedule_time(topo, steps)


#: Wall clock: the ranks start the call at an emulation instant agreed this far ahead.
ALIGN_AHEAD_S = 0.05


def _job(rank: int, n: int, clock: str) -> list[dict[str, Any]]:
    # An unshaped group to agree on start instants (emulation only touches the default group).
    plain = dist.new_group(backend="gloo")
    out = []
    for op, algo, same_size in CASES:
        x = torch.ones(_numel(rank, same_size))
        # One tensor shape on every rank (the wire header checks it); unchecked calls, as modelled.
        p = Payload(x, PayloadMeta(torch.Size([NUMEL]), x.dtype))
        with emulate(LINK, clock=clock) as emu:
            if clock == "virtual":
                # From here only declared compute and communication move the clock: every
                # rank starts the call at exactly START_S.
                emu.compute(START_S - emu.now())
                t0 = emu.now()
            else:
                # Ranks leave emulate's entry apart; a log-depth round waits for its peers'
                # sends, so the call starts at one instant of the shared emulation clock.
                t = torch.tensor([emu.now() + ALIGN_AHEAD_S], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=plain)
                t0 = float(t.item())
                emu.clock.sleep_until(t0)
            if op == "allgather":
                allgather_payloads(p, same_size=same_size, algo=algo, check=False)
            else:
                allreduce_payload(p, algo=algo, check=False)
            took = emu.now() - t0
            out.append({"case": (op, algo, same_size), "s": took, "late_ops": emu.stats.late_ops})
    dist.destroy_process_group(plain)
    return out


@pytest.fixture(scope="module")
def ranks4():  # type: ignore[no-untyped-def]
    group = LazyRanks(N)
    yield group
    group.close()


def _check(results: list[list[dict[str, Any]]]) -> None:
    for i, (op, algo, same_size) in enumerate(CASES):
        model = _model(op, algo, same_size)
        times = [r[i]["s"] for r in results]
        # The collective ends with its last rank (a tree's inner ranks finish earlier).
        assert abs(max(times) - model) <= max(REL_TOL * model, ABS_TOL_S), (CASES[i], times, model)
        if op == "allgather" or algo == "doubling":  # symmetric: every rank ends with the model
            for t in times:
                assert abs(t - model) <= max(REL_TOL * model, ABS_TOL_S), (CASES[i], times, model)


@pytest.mark.multiprocess
def test_virtual_clock_charges_log_depth_rounds_like_the_model(ranks4: LazyRanks) -> None:
    _check(ranks4.run(_job, "virtual", timeout_s=300))


@pytest.mark.multiprocess
@pytest.mark.timing
def test_wall_clock_charges_log_depth_rounds_like_the_model(ranks4: LazyRanks) -> None:
    # Wall time: judged only on a run with no late op (a p2p header or a metadata gather
    # that came in after its modeled time counts) and no host stall (tests/_timing.py).
    results = on_time(lambda: ranks4.run(_job, "wall", timeout_s=300),
                      lambda res: sum(c["late_ops"] for r in res for c in r), setup=ranks4.start)
    _check(results)
