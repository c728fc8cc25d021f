"""`netsim probe --backend emulate`: the probe's checks on the in-process backend.

The probe compares wall-clock times with the model, so it is judged only on runs the host kept
up with (marker ``timing``, tests/_timing.py); the ranks are started outside those runs.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from _timing import on_time
from ccomm.ranks import RankPool
from netsim.model.link import Link
from netsim.probe import ProbeReport
from netsim.probe.emulated import probe_emulate
from netsim.model.topo import Topo

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def pools() -> Iterator[dict[int, RankPool]]:
    made: dict[int, RankPool] = {}
    yield made
    for pool in made.values():
        pool.close()


def _probe(pools: dict[int, RankPool], topo: Topo, **kw: int) -> ProbeReport:
    def start() -> None:
        if topo.n not in pools or pools[topo.n].broken:
            pools[topo.n] = RankPool(topo.n, group_timeout_s=60.0, name="probe-emu")

    return on_time(lambda: probe_emulate(topo, pool=pools[topo.n], **kw), lambda rep: rep.late_ops or 0, setup=start)


@pytest.mark.timing
def test_probe_emulate_two_ranks_within_tolerance(pools: dict[int, RankPool]) -> None:
    rep = _probe(pools, Topo(2, Link(20, 10)), nbytes=256 << 10, samples=8)
    assert rep.ok, rep.table()
    (pair,) = rep.pairs
    # The RTT really includes both latencies: an unshaped loopback would be far below 20 ms.
    assert pair.rtt_median_s > 0.019
    assert {g.op for g in rep.gloo} == {"allreduce", "allgather"}


@pytest.mark.timing
def test_probe_emulate_four_ranks_collectives(pools: dict[int, RankPool]) -> None:
    rep = _probe(pools, Topo(4, Link(40, 5)), nbytes=128 << 10, samples=4)
    assert all(g.n == 4 for g in rep.gloo)
    assert rep.ok, rep.table()
    assert rep.late_ops == 0  # what on_time judged on


def test_probe_emulate_one_shot_ranks_and_late_ops_reported() -> None:
    # Without a pool the probe starts and stops its own ranks; not timed, only its shape.
    rep = probe_emulate(Topo(2, Link(20, 10)), nbytes=4096, samples=1)
    assert isinstance(rep.late_ops, int) and rep.late_ops >= 0
    assert rep.to_json()["late_ops"] == rep.late_ops


def test_probe_emulate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="topo.n"):
        probe_emulate(Topo(1, Link(10, 1)))
    with pytest.raises(ValueError, match="nbytes"):
        probe_emulate(Topo(2, Link(10, 1)), nbytes=0)
    with RankPool(2) as pool:
        with pytest.raises(ValueError, match="pool"):
            probe_emulate(Topo(3, Link(10, 1)), pool=pool)
