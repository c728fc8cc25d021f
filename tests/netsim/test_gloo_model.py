"""gloo's transport model (`netsim.model.gloo`) on hand-computed numbers
(docs/netsim.md#gloos-transport-transportgloo).

Deterministic: pure functions of their arguments. The measured table it was checked against
on real namespaces is in `test_gloo_model_measured.py` (recorded files, no network).
"""
from __future__ import annotations

from collections import defaultdict

import pytest

from ccomm import schedule as ccs
from netsim import Link, Topo, Trace, cost
from netsim.model import gloo

# 8 Mbit/s = 1 MB/s, so a notice (NOTICE_BYTES) takes 0.1 ms on an uplink; 50 ms one way.
LINK = Link(8.0, 50.0)
NOTICE_S = gloo.NOTICE_BYTES / 1e6


def test_notice_bytes_is_a_preamble_plus_headers() -> None:
    assert gloo.NOTICE_BYTES == 100


def test_two_rank_allgather_of_a_tiny_block_pays_the_notice() -> None:
    # Each rank posts (send h0, recv h0, send h1, recv h1) at 0: four notices on its uplink, the
    # recv notices leave at 0.1 and 0.3 ms and arrive 50 ms later; each half (2 bytes) leaves
    # when its notice arrives and arrives one latency after that: 2 latencies, not 1.
    t = gloo.collective_time("allgather", 2, 4, LINK)
    assert t == pytest.approx(0.05 + 4 * NOTICE_S + 2e-6 + 0.05)
    assert cost.allgather_time(4, LINK, 2) == pytest.approx(0.05 + 4e-6)  # the ideal transport


def test_four_rank_allreduce_of_one_element_costs_seven_latencies() -> None:
    # One element: one non-empty segment of 2n. Reduce-scatter carries it r3 -> r2 -> r1 -> r0;
    # only the first hop waits for a notice (the receivers of the later hops have nothing
    # else to wait for, so their notices are out early); the all-gather carries it back in 3
    # hops whose notices are out early too: 2 + 1 + 1 + 3 = 7 latencies, against 6 ideal.
    assert gloo.collective_time("allreduce", 4, 4, LINK) == pytest.approx(7 * 0.05, abs=1e-3)
    assert cost.allreduce_time(4, LINK, 4) == pytest.approx(6 * 0.05, abs=1e-4)


def test_small_segments_expose_the_notice_on_every_ring_step() -> None:
    # 12 kB on 4 ranks: 8 segments of 1.5 kB (1.5 ms). Every one of the 2(n-1) ring steps
    # waits for its receiver's notice: about 2 latencies per step, twice the ideal ring.
    t = gloo.collective_time("allreduce", 4, 12_000, LINK)
    assert 12 * 0.05 < t < 12 * 0.05 + 12 * 2 * (1.5e-3 + 2 * NOTICE_S)
    assert t / cost.allreduce_time(12_000, LINK, 4) > 1.9


def test_long_segments_hide_the_notice() -> None:
    # 16 MB on 4 ranks at 1 MB/s, 5 ms: 16 segments of 1 MB (gloo's largest), each 1 s on the
    # wire: the notice of the next segment arrives while the current one serialises.
    link = Link(8.0, 5.0)
    ideal = cost.allreduce_time(16e6, link, 4)
    assert ideal <= gloo.collective_time("allreduce", 4, 16e6, link) <= 1.01 * ideal


def test_segments_follow_gloo_rules() -> None:
    # numSegments = roundUp(max(ceil(S / 1 MiB), 2n), n); each segment ceil(S / numSegments)
    # rounded up to whole float32 elements.
    def sizes(n: int, nbytes: float) -> set[float]:
        return {a.nbytes for a in gloo.program("allreduce", n, nbytes)[0] if a.kind == "send"}

    assert sizes(4, 204_000) == {25_500.0}  # 8 segments
    assert sizes(4, 3 * gloo.MAX_SEGMENT_BYTES) == {3 * gloo.MAX_SEGMENT_BYTES / 8}
    assert sizes(2, 10 * gloo.MAX_SEGMENT_BYTES) == {gloo.MAX_SEGMENT_BYTES}  # 10 segments
    assert max(sizes(4, 10 * gloo.MAX_SEGMENT_BYTES)) == 873_816.0  # 12 segments, whole elements
    assert sizes(4, 6) == {4.0}  # 2 elements: 2 non-empty segments of one element each


@pytest.mark.parametrize("op,algo,n", [("allreduce", "ring", 2), ("allreduce", "ring", 4), ("allreduce", "ring", 5),
                                       ("allreduce", "doubling", 4), ("allreduce", "tree", 5),
                                       ("allgather", "ring", 3), ("allgather", "ring", 4),
                                       ("allgather", "doubling", 4), ("allgather", "bruck", 5)])
def test_programs_send_what_the_schedules_carry(op: str, algo: str, n: int) -> None:
    # Every pair's sends and the receiver's posted receives agree in order and size (gloo
    # matches them first in, first out), and the bytes received over all ranks are those of
    # ccomm's schedule of the same collective (rings: every segment travels n-1 hops per phase).
    nbytes = 40_000.0
    progs = gloo.program(op, n, nbytes, algo)
    sent: dict[tuple[int, int], list[float]] = defaultdict(list)
    posted: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r, prog in enumerate(progs):
        for a in prog:
            if a.kind == "send":
                sent[(r, a.peer)].append(a.nbytes)
            elif a.kind == "recv":
                posted[(a.peer, r)].append(a.nbytes)
    assert sent == posted
    steps = (ccs.allreduce_schedule(algo, n, nbytes) if op == "allreduce"
             else ccs.allgather_schedule(algo, n, [nbytes] * n))
    assert sum(map(sum, sent.values())) == pytest.approx(sum(b for step in steps for _, _, b in step))


def test_trace_outage_delays_everything() -> None:
    # No bandwidth for the first second: the notices leave at 1 s, then as on a constant link.
    link = Link(None, 50.0, trace=Trace.steps([(0, 0.0), (1, 8.0)]))
    done = gloo.simulate(gloo.program("allgather", 2, 4), link, 0.0)
    assert max(done) == pytest.approx(1.0 + gloo.collective_time("allgather", 2, 4, LINK))
    assert gloo.collective_time("allgather", 2, 4, link, start_s=2.0) == pytest.approx(
        gloo.collective_time("allgather", 2, 4, LINK))


def test_one_rank_and_empty_buffers_take_no_time() -> None:
    assert gloo.collective_time("allreduce", 1, 1e6, LINK) == 0.0
    assert gloo.collective_time("allreduce", 4, 0, LINK) == 0.0
    assert gloo.collective_time("allgather", 4, 0, LINK) == 0.0


def test_deadlock_and_bad_input_are_named() -> None:
    stuck = [[gloo.Action("recv", 0, 1, 10.0), gloo.Action("wait", ops=(0,))], []]
    with pytest.raises(ValueError, match=r"deadlock: ranks \[0\]"):
        gloo.simulate(stuck, LINK)
    with pytest.raises(ValueError, match="op="):
        gloo.program("broadcast", 4, 1.0)
    with pytest.raises(ValueError, match="algo="):
        gloo.program("allgather", 4, 1.0, "tree")
    with pytest.raises(ValueError, match="n="):
        gloo.program("allreduce", 0, 1.0)
    with pytest.raises(ValueError, match="nbytes="):
        gloo.program("allreduce", 4, -1.0)
    with pytest.raises(ValueError, match="link"):
        gloo.collective_time("allreduce", 4, 1.0, 8.0)  # type: ignore[arg-type]


def test_cost_transport_option() -> None:
    assert cost.TRANSPORTS == ("ideal", "gloo")
    assert cost.collective_time("allreduce", 12_000, LINK, 4, transport="gloo") == gloo.collective_time(
        "allreduce", 4, 12_000, LINK)
    assert cost.allgather_time(4, LINK, 4, "bruck", transport="gloo") == gloo.collective_time(
        "allgather", 4, 4, LINK, "bruck")
    assert cost.allreduce_time(12_000, Topo(4, LINK), transport="gloo") == cost.allreduce_time(
        12_000, LINK, 4, transport="gloo")
    with pytest.raises(ValueError, match="transport="):
        cost.allreduce_time(1.0, LINK, 4, transport="nccl")
    with pytest.raises(ValueError, match="transport='gloo' models"):
        cost.collective_time("broadcast", 1.0, LINK, 4, transport="gloo")
    with pytest.raises(ValueError, match="transport='gloo' models"):
        cost.allgather_time(1.0, LINK, 2, sizes=[1.0, 2.0], transport="gloo")
    with pytest.raises(ValueError, match="uniform shared link"):
        cost.allreduce_time(1.0, Topo(2, LINK, pairs={(0, 1): Link(8.0, 5.0)}, shared=False), transport="gloo")


def test_exposed_latency_is_what_serialisation_does_not_explain() -> None:
    # 4 ranks, one element: V = 1.5 x 4 bytes, so almost all of the 7 latencies are exposed;
    # 16 MB at 5 ms: the ideal ring's 6 latencies plus what the rendezvous adds, well under 1 %.
    assert gloo.exposed_latency_s("allreduce", 4, 4, LINK) == pytest.approx(
        gloo.collective_time("allreduce", 4, 4, LINK) - 6e-6)
    link = Link(8.0, 5.0)
    exposed = gloo.exposed_latency_s("allreduce", 4, 16e6, link)
    assert 6 * 0.005 <= exposed <= 0.01 * gloo.collective_time("allreduce", 4, 16e6, link)
    assert gloo.exposed_latency_s("allgather", 1, 1e6, LINK) == 0.0


def test_notices_that_skip_the_backlog_bracket_large_messages_from_below() -> None:
    # With short messages nothing is queued ahead of a notice: both variants agree. With
    # segments longer than a latency, a notice that waits behind data can only be later.
    def both(op: str, n: int, nbytes: float, link: Link) -> tuple[float, float]:
        progs = gloo.program(op, n, nbytes)
        return max(gloo.simulate(progs, link)), max(gloo.simulate(progs, link, notices_queue=False))

    fifo, skip = both("allreduce", 4, 12_000, LINK)
    assert skip == pytest.approx(fifo, rel=1e-3)
    fifo, skip = both("allgather", 4, 816_000, Link(20.0, 50.0))
    assert skip < fifo
