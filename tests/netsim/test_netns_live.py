"""Live netsim.namespaces.netns: real namespaces, the TUN delay wire, the probe (root; marker ``netns``).

The unmarked-``slow`` subset takes a few seconds per test so CI exercises it; the probe grid,
traces, outages, loss and gloo are ``slow``.  Every test uses its own tag and a finalizer
that runs ``down(tag)`` and asserts nothing of that tag remains.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Callable, Iterator

import pytest

from _timing import on_time, wire_late
from netsim.model.link import Link
from netsim.model.topo import Topo
from netsim.model.trace import Trace

pytestmark = pytest.mark.netns

#: Fewer ping-pongs than the CLI's 200 keep the fast tests fast; the median is still stable.
FAST_SAMPLES = 30


def _uniq(base: str) -> str:
    """``base`` made unique to this process (tags are [a-z0-9]{1,8}): concurrent runs on one
    machine (two worktrees, CI beside a developer) then never bring up the same namespaces."""
    if len(base) > 5:  # keep distinct long bases distinct: 5 base-36 digits of their CRC
        base = _base36(zlib.crc32(base.encode()) % 36**5, 5)
    return base + _base36(os.getpid() % 36**3, 3)


def _base36(n: int, width: int) -> str:
    digits = ""
    for _ in range(width):
        n, d = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
    return digits


@pytest.fixture
def make_net() -> Iterator[Callable[..., object]]:
    from netsim.namespaces import netns

    tags: list[str] = []

    def make(topo: Topo, tag: str, **kw: object) -> netns.Net:
        tag = _uniq(tag)
        tags.append(tag)
        return netns.up(topo, tag=tag, **kw)  # type: ignore[arg-type]

    yield make
    for tag in tags:
        assert netns.down(tag) == [], f"tag {tag} not fully removed"


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {ln.split(":")[1].strip() for ln in out.splitlines()}


def _probe_median(net: object, runs: int = 3, **kw: object) -> object:
    """One probe; on a miss two more, and the verdict of the median-goodput run
    (docs/design/netsim.md#tests)."""
    from netsim.probe import probe

    first = probe(net, **kw)  # type: ignore[arg-type]
    if first.ok:
        return first
    reps = [first] + [probe(net, **kw) for _ in range(runs - 1)]  # type: ignore[arg-type]
    reps.sort(key=lambda r: statistics.median(p.bw_mbps for p in r.pairs))
    return reps[len(reps) // 2]


def test_up_creates_only_namespaced_objects_and_down_removes_them(make_net) -> None:
    from netsim.namespaces import netns

    before = _root_links()
    net = make_net(Topo(2, Link(10, 5)), "lv1")
    tag = net.tag
    assert set(netns.list_namespaces()) >= {f"nsm-{tag}-h0", f"nsm-{tag}-h1"}
    assert _root_links() == before  # the root namespace holds only the netns handles
    out = subprocess.run(net.exec_prefix(0) + ["ip", "-o", "addr", "show", "dev", "nsmt0"],
                         capture_output=True, text=True, check=True).stdout
    assert net.hosts[0].addr + "/24" in out
    qd = subprocess.run(["tc", "-n", f"nsm-{tag}-h0", "qdisc", "show", "dev", "nsmt0"],
                        capture_output=True, text=True, check=True).stdout
    assert "htb 1:" in qd
    sysctl = subprocess.run(net.exec_prefix(1) + ["sysctl", "-n",
                            "net.ipv4.tcp_slow_start_after_idle"], capture_output=True, text=True)
    assert sysctl.stdout.strip() == "0"
    root = subprocess.run(["sysctl", "-n", "net.ipv4.tcp_slow_start_after_idle"],
                          capture_output=True, text=True).stdout.strip()
    assert root == "1"  # the root namespace's setting is untouched
    assert net.down() == []
    assert not [n for n in netns.list_namespaces() if n.startswith(f"nsm-{tag}-")]
    assert netns.down(tag) == []  # idempotent


def test_env_forces_gloo_and_nccl_onto_the_emulated_device(make_net) -> None:
    net = make_net(Topo(2, Link(50, 1)), "lv2")
    env = net.env(1, port=29555)
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "nsmt0"
    assert env["NCCL_NET"] == "Socket" and env["NCCL_P2P_DISABLE"] == "1"
    assert env["MASTER_ADDR"] == net.hosts[0].addr and env["MASTER_PORT"] == "29555"
    assert (env["RANK"], env["WORLD_SIZE"]) == ("1", "2")
    assert abs(float(env["NETSIM_T0"]) - net.t0) < 1e-9
    code = "import os; print(os.environ['GLOO_SOCKET_IFNAME'], os.environ['RANK'])"
    p = net.popen(1, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.communicate(timeout=30)[0].split() == ["nsmt0", "1"]


@pytest.mark.timing
def test_probe_wire_two_hosts_fast(make_net) -> None:
    net = make_net(Topo(2, Link(20, 15)), "lv3")
    # 8 MiB (the probe's default floor): smaller transfers are dominated by slow start.
    rep = on_time(lambda: _probe_median(net, samples=FAST_SAMPLES, warmup=5), wire_late)
    assert rep.ok, rep.table()
    assert rep.wire is not None and not rep.wire["bottleneck"], rep.wire  # what on_time judged on


def _controller(tag: str, then: str) -> subprocess.Popen[str]:
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from netsim.namespaces import netns
        from netsim.model.link import Link
        from netsim.model.topo import Topo
        net = netns.up(Topo(2, Link(10, 5)), tag={tag!r})
        print("up", flush=True)
        {then}
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


#: PDEATHSIG takes the wire down with its controller within this (seconds).
WIRE_DEATH_S = 5.0


@pytest.mark.timing
def test_sigkilled_controller_is_cleanable_by_down() -> None:
    from netsim.namespaces import netns

    tag = _uniq("lv4")

    def once() -> tuple[int | None, list[str], list[str], bool]:
        # A process the controller started in a namespace (Net.popen) dies with it too.
        p = _controller(tag, "c = net.popen(1, ['sleep', '60']); print(c.pid, flush=True); "
                             "os.kill(os.getpid(), signal.SIGKILL)")
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "up"
            child = int(p.stdout.readline())
            p.wait(timeout=30)
            deadline = time.monotonic() + WIRE_DEATH_S
            while time.monotonic() < deadline and (any("process" in x for x in netns.leftovers(tag))
                                                   or _alive(child)):
                time.sleep(0.05)
            alive, left = _alive(child), netns.leftovers(tag)  # before down(), which kills it
            return p.returncode, left, netns.down(tag), alive
        finally:
            netns.down(tag)

    code, left, left_after_down, child_alive = on_time(once, lag_limit_s=WIRE_DEATH_S / 5)
    assert code == -signal.SIGKILL
    assert any(x.startswith(f"namespace nsm-{tag}-") for x in left)  # nothing cleaned it yet
    assert not any("process" in x for x in left), left
    assert not child_alive
    assert left_after_down == []


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, reaped by init shortly, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_controller_cleans_up(sig: int) -> None:
    from netsim.namespaces import netns

    tag = _uniq(f"lv5{int(sig)}")
    p = _controller(tag, "time.sleep(60)")
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    p.send_signal(sig)
    p.wait(timeout=30)
    try:
        assert netns.leftovers(tag) == []
    finally:
        netns.down(tag)


@pytest.mark.slow
@pytest.mark.parametrize("mbps,lat_ms", [(5, 50), (20, 30), (100, 10), (100, 100), (1000, 0),
                                         (400, 5)])
def test_probe_grid(make_net, mbps: float, lat_ms: float) -> None:
    net = make_net(Topo(2, Link(mbps, lat_ms)), f"g{mbps}x{lat_ms}"[:8].replace(".", ""))
    rep = _probe_median(net)
    assert rep.ok, rep.table()


@pytest.mark.slow
def test_probe_four_hosts_shared_downlinks(make_net) -> None:
    net = make_net(Topo(4, Link(20, 10)), "lv6")
    rep = _probe_median(net, samples=50, nbytes=4 << 20)
    assert rep.ok, rep.table()


@pytest.mark.slow
def test_probe_mesh_pairs_with_their_own_latency(make_net) -> None:
    slow_pair = Link(10, 25)
    topo = Topo(3, Link(10, 5), pairs={(0, 1): slow_pair, (1, 0): slow_pair}, shared=False)
    net = make_net(topo, "lvm")
    assert net.plan.wire is not None and net.plan.wire["channels"][0]["resources"] == ["pair0-1"]
    rep = _probe_median(net, samples=40, nbytes=4 << 20)
    assert rep.ok, rep.table()
    assert rep.pairs[0].rtt_config_s == pytest.approx(0.050)  # 0 -> 1 and back: 25 ms each


@pytest.mark.slow
def test_probe_bridge_without_delay(make_net) -> None:
    net = make_net(Topo(3, Link(50, 0)), "lv7")
    assert net.plan.mode == "veth"
    rep = _probe_median(net, samples=50, nbytes=8 << 20)
    assert rep.ok, rep.table()


@pytest.mark.slow
def test_jitter_stays_in_window_and_fifo(make_net) -> None:
    net = make_net(Topo(2, Link(20, 20, jitter_ms=5)), "lv8")
    rep = _probe_median(net, samples=100, nbytes=4 << 20)
    assert rep.ok, rep.table()


@pytest.mark.slow
def test_trace_completion_matches_transfer_time(make_net) -> None:
    tr = Trace.steps([(0, 20), (2, 5), (4, 20)])
    net = make_net(Topo(2, Link(None, 10, trace=tr)), "lv9")
    rep = _probe_median(net, samples=20, nbytes=6 << 20, duplex=False)
    assert rep.ok, rep.table()


@pytest.mark.slow
def test_outage_holds_packets(make_net) -> None:
    # A 0.3 s outage every 1.5 s (looping), so the transfer crosses one whenever it starts.
    tr = Trace([0, 1.2], [20, 0], loop=True, period_s=1.5)
    net = make_net(Topo(2, Link(None, 10, trace=tr)), "lva")
    rep = _probe_median(net, samples=10, nbytes=6 << 20, duplex=False)
    assert rep.ok, rep.table()


@pytest.mark.slow
def test_loss_drops_packets_and_tcp_recovers(make_net) -> None:
    from netsim.probe import probe

    net = make_net(Topo(2, Link(20, 10, loss=0.01)), "lvb")
    rep = probe(net, samples=20, nbytes=2 << 20, duplex=False)
    assert rep.wire is not None and rep.wire["drops"]["loss"] > 0
    mathis = net.topo.link.mathis_mbps
    assert mathis is not None
    # Informational per spec: goodput within 2x of min(configured, Mathis).
    assert rep.pairs[0].bw_mbps > min(20, mathis) / 2


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_gloo_collectives_match_cost_model(make_net, n: int) -> None:
    from netsim.probe import probe_gloo

    net = make_net(Topo(n, Link(20, 30)), f"gl{n}")
    res = probe_gloo(net, iters=3)
    bad = [(g.op, round(g.ratio, 3)) for g in res if not g.ok]
    assert not bad, bad
