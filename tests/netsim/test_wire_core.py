"""The delay wire's scheduling on a fake clock: routing, due times, FIFO, loss, drops."""

from __future__ import annotations

import struct

import pytest

from netsim.model.link import uniform
from netsim.model.trace import Trace
from netsim.namespaces.wire import trace_finish, trace_steps
from netsim.namespaces.wire_core import Channel, WireCore, constant_finish

ADDRS = [bytes([10, 213, 7, i + 1]) for i in range(3)]


def pkt(dst: int, size: int = 1500, version: int = 4) -> bytes:
    """A minimal IPv4 header (only version and destination matter to the wire) plus padding."""
    hdr = bytes([version << 4 | 5]) + b"\0" * 11 + ADDRS[0] + ADDRS[dst]
    return hdr + b"\0" * (size - len(hdr))


def core(**chan: object) -> WireCore:
    ch = Channel(**chan)  # type: ignore[arg-type]
    return WireCore(ADDRS, {(i, j): ch for i in range(3) for j in range(3) if i != j})


def test_routes_by_destination_and_adds_latency() -> None:
    w = core(latency_s=0.02)
    d = w.admit(0, pkt(2), now=5.0)
    assert d is not None and (d.src, d.dst, d.seq) == (0, 2, 0)
    assert d.due == pytest.approx(5.02)
    assert w.admit(0, pkt(2), now=5.0).seq == 1  # type: ignore[union-attr]
    assert w.admit(1, pkt(2), now=5.0).seq == 0  # type: ignore[union-attr]  # per pair


def test_drops_non_ipv4_and_unknown_destinations() -> None:
    w = core(latency_s=0.0)
    assert w.admit(0, pkt(1, version=6), 0.0) is None
    assert w.admit(0, b"\x45" * 10, 0.0) is None  # truncated
    foreign = pkt(1)[:16] + bytes([192, 168, 1, 1]) + pkt(1)[20:]
    assert w.admit(0, foreign, 0.0) is None
    assert w.admit(0, pkt(0), 0.0) is None  # to itself: no channel
    assert w.drops == {"non_ipv4": 2, "unknown_dst": 2, "loss": 0, "queue": 0}


def test_jitter_is_the_shared_uniform_draw_and_delivery_stays_fifo() -> None:
    w = core(latency_s=0.010, jitter_s=0.008)
    dues = [w.admit(0, pkt(1), now=k * 1e-4).due for k in range(200)]  # type: ignore[union-attr]
    raw = [k * 1e-4 + 0.010 + 0.008 * (2 * uniform(0, 0, 1, k) - 1) for k in range(200)]
    assert dues == pytest.approx([max(raw[: k + 1]) for k in range(200)], abs=1e-12)  # FIFO
    assert all(0.002 <= d - k * 1e-4 <= 0.018 + 0.02 for k, d in enumerate(dues))
    assert dues != raw  # the window is wide enough that FIFO really held some back


def test_reorder_keeps_raw_delays() -> None:
    w = core(latency_s=0.010, jitter_s=0.008, reorder=True)
    dues = [w.admit(0, pkt(1), now=k * 1e-4).due for k in range(50)]  # type: ignore[union-attr]
    raw = [k * 1e-4 + 0.010 + 0.008 * (2 * uniform(0, 0, 1, k) - 1) for k in range(50)]
    assert dues == pytest.approx(raw)


def test_loss_follows_the_seeded_draw() -> None:
    w = core(latency_s=0.01, loss=0.2)
    kept = [w.admit(0, pkt(1), 0.0) is not None for _ in range(2000)]
    expect = [uniform(0, 0, 1, k, 1) >= 0.2 for k in range(2000)]
    assert kept == expect
    assert w.drops["loss"] == expect.count(False)
    assert 300 < w.drops["loss"] < 500


def test_drop_tail_above_queue_and_release_on_delivery() -> None:
    w = core(latency_s=0.1, queue_bytes=4500)
    ds = [w.admit(0, pkt(1), 0.0) for _ in range(4)]
    assert [d is not None for d in ds] == [True, True, True, False]
    assert w.inflight(0, 1) == 4500 and w.drops["queue"] == 1
    w.delivered(ds[0])  # type: ignore[arg-type]
    assert w.admit(0, pkt(1), 0.2) is not None


def test_reservation_rule_on_a_shared_downlink() -> None:
    # Hosts 0 and 2 both send to 1 through down1 at 12 Mbit/s (1 ms per 1500 B packet).
    ch = {(i, j): Channel(0.005, resources=(f"down{j}",)) for i in range(3) for j in range(3)
          if i != j}
    res = {f"down{j}": constant_finish(12e6) for j in range(3)}
    w = WireCore(ADDRS, ch, res)
    a = w.admit(0, pkt(1), now=1.0)
    b = w.admit(2, pkt(1), now=1.0)
    c = w.admit(0, pkt(2), now=1.0)  # another downlink: not delayed by the first two
    assert a.due == pytest.approx(1.006)  # type: ignore[union-attr]
    assert b.due == pytest.approx(1.007)  # type: ignore[union-attr]  # waits for a's slot
    assert c.due == pytest.approx(1.006)  # type: ignore[union-attr]
    late = w.admit(2, pkt(1), now=2.0)  # the bucket has depth 0: idle time is not banked
    assert late.due == pytest.approx(2.006)  # type: ignore[union-attr]


def test_trace_resource_pauses_in_outage() -> None:
    tr = Trace([0, 1, 2], [12, 0, 12])
    fin = trace_finish({"times": list(tr.times_s), "mbps": list(tr.mbps)}, 1.0, t0=100.0)
    assert fin(100.0, 12000) == pytest.approx(100.001)
    assert fin(100.9995, 12000) == pytest.approx(102.0005)  # half before, half after the gap
    assert fin(101.5, 12000) == pytest.approx(102.001)


def test_trace_steps_repeat_when_looping() -> None:
    steps = trace_steps([0.0, 1.0], [5.0, 10.0], period_s=2.0)
    assert [next(steps) for _ in range(5)] == [(0.0, 5.0), (1.0, 10.0), (2.0, 5.0), (3.0, 10.0),
                                               (4.0, 5.0)]
    assert list(trace_steps([0.0, 1.0], [5.0, 10.0], None)) == [(0.0, 5.0), (1.0, 10.0)]


@pytest.mark.parametrize("kw,field", [({"latency_s": -1}, "latency_s"),
                                      ({"latency_s": 0.01, "jitter_s": 0.02}, "jitter_s"),
                                      ({"latency_s": 0.01, "loss": 1.0}, "loss"),
                                      ({"latency_s": 0.01, "queue_bytes": 10}, "queue_bytes")])
def test_channel_validation(kw: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Channel(**kw)  # type: ignore[arg-type]


def test_unknown_resource_rejected() -> None:
    with pytest.raises(ValueError, match="unknown resources"):
        WireCore(ADDRS, {(0, 1): Channel(0.0, resources=("nope",))})


def test_header_layout_assumption() -> None:
    # The wire reads the destination at bytes 16..20 of the IPv4 header.
    hdr = pkt(2)
    assert struct.unpack("!4s", hdr[16:20])[0] == ADDRS[2]


def test_burst_catches_up_a_late_read_but_never_delivers_early() -> None:
    ch = {(i, j): Channel(0.005, resources=(f"down{j}",)) for i in range(3) for j in range(3)
          if i != j}
    res = {f"down{j}": constant_finish(12e6) for j in range(3)}  # 1 ms per 1500 B packet

    def dues(burst_s: float) -> list[float]:
        w = WireCore(ADDRS, ch, res, burst_s=burst_s)
        reads = [1.0 + k * 1e-3 + (0.5e-3 if k == 5 else 0.0) for k in range(10)]
        return [w.admit(0, pkt(1), now=t).due for t in reads]  # type: ignore[union-attr]

    nominal = [1.0 + (k + 1) * 1e-3 + 0.005 for k in range(10)]
    assert dues(0.0) == pytest.approx(nominal[:5] + [x + 0.5e-3 for x in nominal[5:]])
    burst = dues(2e-3)  # the first packet after idle spends banked time, like htb's burst
    assert burst[:5] == pytest.approx([x - 1e-3 for x in nominal[:5]])
    assert burst[5] == pytest.approx(1.0055 + 0.005)  # never before it was read
    assert burst[6:] == pytest.approx([x - 1e-3 for x in nominal[6:]])  # no lasting shift
    w = WireCore(ADDRS, ch, res, burst_s=2e-3)
    assert w.admit(0, pkt(1), now=3.0).due >= 3.005  # type: ignore[union-attr]  # never early
    with pytest.raises(ValueError, match="burst_s"):
        WireCore(ADDRS, ch, res, burst_s=1.0)


def test_acks_skip_the_shaper_backlog_but_use_capacity() -> None:
    ch = {(i, j): Channel(0.005, resources=(f"pair{i}{j}",)) for i in range(3) for j in range(3)
          if i != j}
    res = {f"pair{i}{j}": constant_finish(12e6) for i in range(3) for j in range(3)}
    w = WireCore(ADDRS, ch, res)
    data = [w.admit(0, pkt(1), now=1.0) for _ in range(10)]  # 10 ms of backlog
    ack = w.admit(0, pkt(1, size=52), now=1.0)
    after = w.admit(0, pkt(1), now=1.0)
    assert data[-1].due == pytest.approx(1.015)  # type: ignore[union-attr]
    assert ack.due == pytest.approx(1.005)  # type: ignore[union-attr]  # not behind the data
    # The ACK's 52 bytes still took 52*8/12e6 s of the pair's capacity.
    assert after.due == pytest.approx(1.016 + 52 * 8 / 12e6)  # type: ignore[union-attr]
    plain = core(latency_s=0.005)  # no shaper: ACKs stay in FIFO order like everything else
    assert plain.admit(0, pkt(1, size=52), now=1.0).due == pytest.approx(1.005)  # type: ignore[union-attr]
