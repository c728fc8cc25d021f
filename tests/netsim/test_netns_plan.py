"""Pure plans of netsim.namespaces.netns: golden command lines, the prefix guarantee, root refusal."""

from __future__ import annotations

import os

import pytest

from netsim.namespaces import commands as C
from netsim.model.link import Link
from netsim.namespaces.plan import Caps, FeatureError, UpOptions, plan_up
from netsim.model.topo import Topo
from netsim.model.trace import Trace

NO_NETEM = Caps(netem=False, tun=True, htb=True)
WITH_NETEM = Caps(netem=True, tun=True, htb=True)


def test_htb_recipe_golden() -> None:
    # R = 10 Mbit/s * (1500+14)/(1500-52); burst = max(2 frames, 1 ms of R); quantum = 1 frame.
    cmds = C.htb("nsm-a-h0", "nsm0", 10e6 * 1514 / 1448, 1500)
    assert [c.argv for c in cmds] == [
        ("tc", "-n", "nsm-a-h0", "qdisc", "add", "dev", "nsm0", "root", "handle", "1:",
         "htb", "default", "1"),
        ("tc", "-n", "nsm-a-h0", "class", "add", "dev", "nsm0", "parent", "1:", "classid", "1:1",
         "htb", "rate", "10455801bit", "ceil", "10455801bit", "burst", "3028", "cburst", "3028",
         "quantum", "1514"),
    ]
    assert cmds[0].undo == ("tc", "-n", "nsm-a-h0", "qdisc", "del", "dev", "nsm0", "root")
    # At 1 Gbit/s one millisecond of line rate (125 kB) exceeds two frames.
    assert C.htb_params(1e9, 1500) == (1_000_000_000, 125_000, 1514)


def test_change_line_restates_burst() -> None:
    line = C.htb_change_line("nsmt0", 20e6, 1500, 0)
    assert line == ("class change dev nsmt0 parent 1: classid 1:1 htb rate 20000000bit "
                    "ceil 20000000bit burst 3000 cburst 3000 quantum 1500")


def test_netem_limit_covers_bdp() -> None:
    # 1 Gbit/s x 100 ms = 12.5 MB: 1.5 BDP / 1514 B frames is far above netem's default 1000.
    assert C.netem_limit(1000, 1e9, 0.1, 0.0, 1500) == 12385
    assert C.netem_limit(1000, 10e6, 0.01, 0.0, 1500) == 1000
    cmd = C.netem("nsm-a-h0", "nsm0", 0.025, 0.005, 1200, 0.01)
    assert cmd.argv[-8:] == ("netem", "delay", "25.000ms", "5.000ms", "limit", "1200", "loss",
                             "1%")
    assert cmd.argv[:10] == ("tc", "-n", "nsm-a-h0", "qdisc", "add", "dev", "nsm0", "parent",
                             "1:1", "handle")


def test_veth_peer_goes_straight_into_other_namespace() -> None:
    cmd = C.veth("nsm-a-h0", "nsm0", "nsm-a-sw", "nsmp0")
    assert cmd.argv == ("ip", "-n", "nsm-a-h0", "link", "add", "nsm0", "type", "veth", "peer",
                        "name", "nsmp0", "netns", "nsm-a-sw")


@pytest.mark.parametrize("bad", ["", "UPPER", "toolongtag", "a-b", "a b"])
def test_bad_tag_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="tag"):
        C.host_ns(bad, 0)


@pytest.mark.parametrize("argv", [
    ("ip", "link", "add", "x", "type", "veth"),               # root namespace
    ("tc", "qdisc", "add", "dev", "eth0", "root", "htb"),     # root namespace
    ("ip", "netns", "del", "foreign"),                        # not a netsim namespace
    ("ip", "-n", "nsm-a-h0x", "link", "set", "lo", "up"),     # near miss of the pattern
    ("sh", "-c", "ip netns exec nsm-a-h0 true"),
])
def test_check_scoped_rejects_unscoped(argv: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="not scoped"):
        C.check_scoped(C.Cmd(argv))


def _all_plans() -> list[tuple[str, Topo, Caps, UpOptions]]:
    steps = Trace.steps([(0, 100), (1, 10)])
    outage = Trace([0, 1, 2], [20, 0, 20])
    return [
        ("wire2", Topo(2, Link(10, 20)), NO_NETEM, UpOptions(tag="a")),
        ("wire4", Topo(4, Link(20, 30)), NO_NETEM, UpOptions(tag="a")),
        ("veth2", Topo(2, Link(10, 0)), NO_NETEM, UpOptions(tag="a")),
        ("bridge3", Topo(3, Link(1000, 0)), NO_NETEM, UpOptions(tag="b")),
        ("netem3", Topo(3, Link(50, 10, 2, 0.01)), WITH_NETEM, UpOptions(tag="c")),
        ("mesh3", Topo(3, Link(10, 5), shared=False), WITH_NETEM, UpOptions(tag="d")),
        ("trace2", Topo(2, Link(None, 5, trace=steps)), NO_NETEM, UpOptions(tag="e")),
        ("outage2", Topo(2, Link(None, 5, trace=outage)), NO_NETEM, UpOptions(tag="f")),
        ("jumbo2", Topo(2, Link(1000, 5)), NO_NETEM, UpOptions(tag="g")),
    ]


@pytest.mark.parametrize("name,topo,caps,opts", _all_plans(), ids=[p[0] for p in _all_plans()])
def test_prefix_guarantee(name: str, topo: Topo, caps: Caps, opts: UpOptions) -> None:
    plan = plan_up(topo, caps, opts)
    for cmd in plan.commands():
        C.check_scoped(cmd)  # raises on any command outside a netsim namespace
        ns = [a for a in cmd.argv if a.startswith("nsm-")]
        assert ns and all(n.startswith(f"nsm-{opts.tag}-") for n in ns), cmd
    assert plan_up(topo, caps, opts) == plan  # pure: same input, same plan


def test_wire_mode_golden_two_hosts() -> None:
    plan = plan_up(Topo(2, Link(10, 20)), NO_NETEM, UpOptions(tag="a", subnet=7))
    assert plan.mode == "wire" and plan.namespaces == ("nsm-a-h0", "nsm-a-h1")
    assert [h.addr for h in plan.hosts] == ["10.213.7.1", "10.213.7.2"]
    assert [str(c) for c in plan.post[:4]] == [
        "ip -n nsm-a-h0 addr add 10.213.7.1/24 dev nsmt0",
        "ip -n nsm-a-h0 link set dev nsmt0 mtu 1500",
        "ip -n nsm-a-h0 link set dev nsmt0 gso_max_segs 1",
        "ip -n nsm-a-h0 link set dev nsmt0 up",
    ]
    # TUN: no Ethernet header, so R = B * 1500/1448 and the quantum is the MTU.
    assert "rate 10359116bit" in str(plan.post[5]) and "quantum 1500" in str(plan.post[5])
    w = plan.wire
    assert w is not None and w["tun"] is True
    assert w["channels"] == [
        {"src": 0, "dst": 1, "latency_s": 0.02, "jitter_s": 0.0, "loss": 0.0, "resources": [],
         "queue_bytes": 4 << 20, "reorder": False},
        {"src": 1, "dst": 0, "latency_s": 0.02, "jitter_s": 0.0, "loss": 0.0, "resources": [],
         "queue_bytes": 4 << 20, "reorder": False},
    ]
    sysctls = [str(c) for c in plan.pre if "sysctl" in c.argv]
    assert "ip netns exec nsm-a-h0 sysctl -q -w net.ipv4.tcp_slow_start_after_idle=0" in sysctls
    assert "ip netns exec nsm-a-h1 sysctl -q -w net.ipv6.conf.all.disable_ipv6=1" in sysctls


def test_wire_shapes_downlinks_for_more_than_two_hosts() -> None:
    plan = plan_up(Topo(3, Link(20, 30)), NO_NETEM, UpOptions(tag="a"))
    w = plan.wire
    assert w is not None
    assert {c["dst"]: c["resources"] for c in w["channels"] if c["src"] == 0} == {
        1: ["down1"], 2: ["down2"]}
    assert w["resources"]["down1"] == {"rate_bps": pytest.approx(20e6 * 1500 / 1448)}
    htbs = [c for c in plan.post if c.argv[:1] == ("tc",)]
    assert len(htbs) == 6  # uplinks stay in the kernel (qdisc + class per host)


def test_netem_layout_when_kernel_has_it() -> None:
    plan = plan_up(Topo(3, Link(50, 10, 2, 0.01)), WITH_NETEM, UpOptions(tag="c"))
    assert plan.mode == "veth" and plan.wire is None
    assert plan.namespaces[-1] == "nsm-c-sw"
    netems = [c for c in plan.pre if "netem" in c.argv]
    assert len(netems) == 3
    assert "parent 1:1 handle 10: netem delay 10.000ms 2.000ms" in str(netems[0])
    ports = [c for c in plan.pre if c.argv[3:6] == ("qdisc", "add", "dev") and "nsm-c-sw" in c.argv]
    assert len(ports) == 3  # downlinks shaped on the switch ports


def test_no_delay_needs_neither_netem_nor_wire() -> None:
    plan = plan_up(Topo(2, Link(100, 0)), NO_NETEM, UpOptions(tag="a"))
    assert plan.mode == "veth" and plan.wire is None


def test_outages_move_shaping_into_the_wire() -> None:
    tr = Trace([0, 1, 2], [20, 0, 20])
    plan = plan_up(Topo(2, Link(None, 5, trace=tr)), NO_NETEM, UpOptions(tag="f"))
    assert plan.wire is not None and not [c for c in plan.post if c.argv[0] == "tc"]
    assert plan.wire["resources"]["up0"]["trace"]["mbps"] == [20.0, 0.0, 20.0]
    assert plan.wire["channels"][0]["resources"] == ["up0", "down1"]


def test_trace_replayed_by_class_change() -> None:
    tr = Trace.steps([(0, 100), (1, 10)])
    plan = plan_up(Topo(2, Link(None, 5, trace=tr)), NO_NETEM, UpOptions(tag="e"))
    assert plan.wire is not None
    ch = plan.wire["changes"]
    assert [c["ns"] for c in ch] == ["nsm-e-h0", "nsm-e-h1"]
    assert ch[0]["times"] == [0.0, 1.0] and ch[0]["mbps"] == [100.0, 10.0]


def test_jumbo_mtu_above_300_mbps() -> None:
    assert plan_up(Topo(2, Link(1000, 5)), NO_NETEM, UpOptions(tag="g")).mtu == 65000
    assert plan_up(Topo(2, Link(100, 5)), NO_NETEM, UpOptions(tag="g")).mtu == 1500
    assert plan_up(Topo(2, Link(1000, 0)), NO_NETEM, UpOptions(tag="g")).mtu == 65000
    assert plan_up(Topo(2, Link(1000, 0)), NO_NETEM, UpOptions(tag="g", mtu=9000)).mtu == 9000


def test_netem_requested_but_absent() -> None:
    with pytest.raises(FeatureError, match="netem"):
        plan_up(Topo(2, Link(10, 20)), NO_NETEM, UpOptions(tag="a", delay="netem"))


@pytest.mark.parametrize("field,value", [("delay", "fast"), ("subnet", 300), ("mtu", 100),
                                         ("min_step_s", 0.0)])
def test_bad_options(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        UpOptions(**{field: value})  # type: ignore[arg-type]


def test_refuses_without_root_before_any_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from netsim.namespaces import netns

    ran: list[object] = []
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns, "run_argv", lambda *a, **k: ran.append(a))
    with pytest.raises(PermissionError, match="needs root.*netsim.emulate"):
        netns.up(Topo(2, Link(10, 20)), tag="x")
    with pytest.raises(PermissionError, match="needs root"):
        netns.down("x")
    assert ran == []
