"""Live netsim.namespaces.mininet (root, Debian's mininet): the wire inside Mininet hosts, then cleanup.

Skipped with the reason when Mininet is absent (``NETSIM_REQUIRE_MININET=1`` makes that a
failure, for CI where it is installed).
"""

from __future__ import annotations

import subprocess

import pytest

from _timing import on_time, wire_late
from netsim.model.link import Link
from netsim.model.topo import Topo

pytestmark = [pytest.mark.netns, pytest.mark.mininet]


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines()}


@pytest.mark.timing
def test_mininet_two_hosts_probe_and_clean_stop() -> None:
    from netsim.namespaces import mininet
    from netsim.probe import probe

    before = _root_links()
    net = mininet.up(Topo(2, Link(10, 10)), tag="mnt1")
    try:
        assert net.dev == "nsmt0" and net.plan.mode == "mininet-wire"
        assert any(x.startswith("nsms0") for x in _root_links() - before)  # Mininet's bridge
        # 8 MiB (the probe's floor) keeps slow start under 1 % of the transfer.
        rep = on_time(lambda: probe(net, samples=20, warmup=5, duplex=False), wire_late)
        assert rep.ok, rep.table()
    finally:
        assert net.down() == []
    assert _root_links() == before


@pytest.mark.slow
@pytest.mark.timing
def test_mininet_four_hosts_ring_probe() -> None:
    from netsim.namespaces import mininet
    from netsim.probe import probe

    net = mininet.up(Topo(4, Link(20, 5)), tag="mnt2")
    try:
        rep = on_time(lambda: probe(net, samples=50, nbytes=4 << 20), wire_late)
        assert rep.ok, rep.table()
    finally:
        assert net.down() == []


def test_a_second_mininet_net_is_refused_and_the_first_survives() -> None:
    """Host names are fixed, so a second net would collide; its failed ``up`` used to clean
    up by deleting every netsim Mininet link in the root namespace, the first net's too."""
    from netsim.namespaces import mininet

    before = _root_links()
    net = mininet.up(Topo(2, Link(10, 10)), tag="mnt2")
    try:
        up_links = _root_links() - before
        with pytest.raises(RuntimeError, match=r"another netsim Mininet network is up .*netsim down --tag mnt2"):
            mininet.up(Topo(2, Link(10, 10)), tag="mnt3")
        assert _root_links() - before == up_links  # the first net is untouched
    finally:
        assert net.down() == []
    assert _root_links() == before
