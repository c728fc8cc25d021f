"""`netsim probe --backend emulate`: the probe's checks on the in-process backend."""
from __future__ import annotations

import pytest

from netsim.link import Link
from netsim.probe_emulate import probe_emulate
from netsim.topo import Topo

pytestmark = pytest.mark.multiprocess


def test_probe_emulate_two_ranks_within_tolerance() -> None:
    rep = probe_emulate(Topo(2, Link(20, 10)), nbytes=256 << 10, samples=8)
    assert rep.ok, rep.table()
    (pair,) = rep.pairs
    # The RTT really includes both latencies: an unshaped loopback would be far below 20 ms.
    assert pair.rtt_median_s > 0.019
    assert {g.op for g in rep.gloo} == {"allreduce", "allgather"}


def test_probe_emulate_four_ranks_collectives() -> None:
    rep = probe_emulate(Topo(4, Link(40, 5)), nbytes=128 << 10, samples=4)
    assert all(g.n == 4 for g in rep.gloo)
    assert rep.ok, rep.table()


def test_probe_emulate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="topo.n"):
        probe_emulate(Topo(1, Link(10, 1)))
    with pytest.raises(ValueError, match="nbytes"):
        probe_emulate(Topo(2, Link(10, 1)), nbytes=0)
