"""Cost model: the hand table on uniform links, heterogeneity, traces, and = Simulator."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim import cost
from _simulator import Collective, Program, Simulator
from netsim.model.link import Link
from netsim.model.topo import Topo
from netsim.model.trace import Trace

REL = 1e-9  # closed forms and event replays must agree to rounding
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)

MBPS, LAT_MS, S = 80.0, 7.0, 3_000_000.0
B = MBPS * 1e6 / 8  # byte/s
L = LAT_MS / 1000


@pytest.fixture(params=[True, False], ids=["shared", "mesh"])
def shared(request: pytest.FixtureRequest) -> bool:
    return request.param


LINK = Link(MBPS, LAT_MS)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_hand_table_uniform(n: int, shared: bool) -> None:
    kw = dict(n=n, shared=shared)
    assert cost.p2p_time(S, LINK) == pytest.approx(L + S / B, rel=REL)
    ring = cost.allreduce_time(S, LINK, algo="ring", **kw)
    assert ring == pytest.approx(2 * (n - 1) * (L + S / (n * B)), rel=REL)
    assert ring == pytest.approx(2 * (n - 1) / n * S / B + 2 * (n - 1) * L, rel=REL)
    assert cost.reduce_scatter_time(S, LINK, **kw) == pytest.approx((n - 1) * (L + S / (n * B)), rel=REL)
    assert cost.allgather_time(S, LINK, algo="ring", **kw) == pytest.approx((n - 1) * (L + S / B), rel=REL)
    direct = L + ((n - 1) * S / B if shared else S / B)
    assert cost.allgather_time(S, LINK, algo="direct", **kw) == pytest.approx(direct, rel=REL)
    a2a = L + ((n - 1) * S / (n * B) if shared else S / (n * B))
    assert cost.alltoall_time(S, LINK, **kw) == pytest.approx(a2a, rel=REL)
    for k in (1, 3):
        chain = cost.broadcast_time(S, LINK, algo="chain", chunks=k, **kw)
        assert chain == pytest.approx((n - 2 + k) * (L + S / (k * B)), rel=REL)
    ps_one_way = L + ((n - 1) * S / B if shared else S / B)
    assert cost.ps_time(S, LINK, push=True, pull=False, **kw) == pytest.approx(ps_one_way, rel=REL)
    assert cost.ps_time(S, LINK, **kw) == pytest.approx(2 * ps_one_way, rel=REL)
    assert cost.barrier_time(LINK, **kw) == pytest.approx(math.ceil(math.log2(n)) * L, rel=REL)


@pytest.mark.parametrize("n", [2, 3, 7, 15])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_hand_table_tree(n: int, k: int, shared: bool) -> None:
    # Full binary trees (n = 2^(h+1) - 1) and n = 2: every step has its widest fan-in active.
    h = int(math.log2(n + 1)) - 1 if n > 2 else 1
    assert cost.tree_depth(n) == h
    c = 2 if shared and n > 2 else 1
    got = cost.allreduce_time(S, LINK, n=n, algo="tree", chunks=k, shared=shared)
    assert got == pytest.approx(2 * (h + k - 1) * (L + c * S / (k * B)), rel=REL)


def test_single_rank_costs_nothing() -> None:
    for op in cost.ALGOS:
        assert cost.collective_time(op, S, LINK, n=1) == 0.0


def test_link_and_uniform_topo_agree() -> None:
    topo = Topo(4, LINK, shared=False)
    assert cost.allreduce_time(S, topo) == cost.allreduce_time(S, LINK, n=4, shared=False)
    with pytest.raises(ValueError, match="n=3 differs"):
        cost.allreduce_time(S, topo, n=3)
    with pytest.raises(ValueError, match="n is required"):
        cost.allreduce_time(S, LINK)


def test_ps_heterogeneous() -> None:
    server = Link(100, 2)
    workers = {1: Link(10, 2), 2: Link(40, 2), 3: Link(40, 2)}
    topo = Topo(4, server, hosts=workers)
    push = 0.002 + max(max(S * 8 / (lk.bandwidth_mbps * 1e6) for lk in workers.values()), 3 * S * 8 / 100e6)
    assert cost.ps_time(S, topo, push=True, pull=False) == pytest.approx(push, rel=REL)
    pairs = {(i, 0): Link(m, lat) for i, (m, lat) in {1: (10, 30), 2: (40, 80), 3: (20, 5)}.items()}
    mesh = Topo(4, Link(100, 1), pairs=pairs, shared=False)
    want = max(lk.latency_s + S * 8 / (lk.bandwidth_mbps * 1e6) for lk in pairs.values())
    assert cost.ps_time(S, mesh, push=True, pull=False) == pytest.approx(want, rel=REL)


def test_ring_allgather_per_rank_sizes() -> None:
    n, sizes = 4, [1e6, 4e5, 2.5e6, 0.0]
    got = cost.allgather_time(0, LINK, n=n, sizes=sizes)
    # step k: rank i forwards block (i - k) mod n; the step costs its largest message
    want = sum(L + max(sizes[(i - k) % n] for i in range(n)) / B for k in range(n - 1))
    assert got == pytest.approx(want, rel=REL)
    assert cost.allgather_time(S, LINK, n=n, sizes=[S] * n) == pytest.approx(cost.allgather_time(S, LINK, n=n), rel=REL)


def test_traces_chain_steps_through_transfer_time() -> None:
    trace = Trace.steps([(0, 50), (0.2, 0), (0.5, 5), (1.0, 80)])
    link = Link(None, 3, trace=trace)
    n, start = 4, 0.05
    t = start
    for _ in range(2 * (n - 1)):
        t += link.transfer_time(S / n, t)
    assert cost.allreduce_time(S, link, n=n, start_s=start) == pytest.approx(t - start, rel=REL)


def test_lossy_pair_is_capped_by_mathis() -> None:
    lossy = Link(1000, 20, loss=0.02)
    got = cost.allreduce_time(S, lossy, n=3)
    cap_Bps = lossy.mathis_mbps * 1e6 / 8
    assert got == pytest.approx(4 * (0.020 + S / 3 / cap_Bps), rel=REL)


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: cost.schedule("bogus", 4, 1.0), "op="),
        (lambda: cost.schedule("allreduce", 4, 1.0, "direct"), "algo="),
        (lambda: cost.schedule("allreduce", 0, 1.0), "n="),
        (lambda: cost.schedule("allreduce", 4, -1.0), "nbytes="),
        (lambda: cost.schedule("allreduce", 4, 1.0, chunks=0), "chunks="),
        (lambda: cost.schedule("allgather", 4, 1.0, sizes=[1, 2]), "sizes"),
        (lambda: cost.schedule("allreduce", 4, 1.0, sizes=[1, 2, 3, 4]), "sizes"),
        (lambda: cost.schedule("broadcast", 4, 1.0, root=4), "root="),
        (lambda: cost.ps_time(1.0, LINK, n=3, push=False, pull=False), "push"),
    ],
)
def test_validation(call: Callable[[], object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        call()


def test_schedules_move_the_right_bytes() -> None:
    n = 5
    ring = cost.schedule("allreduce", n, 1000.0, "ring")
    assert len(ring) == 2 * (n - 1) and all(len(s) == n for s in ring)
    assert sum(b for step in ring for _, _, b in step) == pytest.approx(2 * (n - 1) * 1000.0)
    tree = cost.schedule("allreduce", n, 1000.0, "tree", chunks=2)
    # reduce sends each non-root's data once to its parent, broadcast once back: 2(n-1) edges x k chunks
    assert sum(len(s) for s in tree) == 2 * (n - 1) * 2
    direct = cost.schedule("allgather", n, 10.0, "direct")
    assert len(direct) == 1 and sorted((s, d) for s, d, _ in direct[0]) == [(s, d) for s in range(n) for d in range(n) if s != d]


# ---------------------------------------------------------------------------- = Simulator
EXACT_OPS = [
    ("allreduce", "ring", 1),
    ("reduce_scatter", "ring", 1),
    ("allgather", "ring", 1),
    ("allgather", "direct", 1),
    ("alltoall", "direct", 1),
    ("broadcast", "chain", 1),
    ("ps", "pushpull", 1),
    ("ps", "push", 1),
    ("barrier", "dissemination", 1),
]


def simulate(topo: Topo, op: str, algo: str, nbytes: float, chunks: int = 1) -> float:
    def program(rank: int) -> Program:
        yield Collective(op, nbytes, algo, chunks=chunks)

    return Simulator(topo).run(program).makespan


@SETTINGS
@given(
    st.integers(2, 8),
    st.booleans(),
    st.sampled_from(EXACT_OPS),
    st.floats(1e3, 5e6),
    st.sampled_from([1.0, 10.0, 100.0, 1000.0]),
    st.sampled_from([0.0, 1.0, 30.0]),
)
def test_closed_form_equals_simulator_uniform(
    n: int, shared: bool, op_algo: tuple[str, str, int], nbytes: float, mbps: float, lat: float
) -> None:
    op, algo, _ = op_algo
    topo = Topo.uniform(n, mbps, lat, shared=shared)
    want = cost.collective_time(op, nbytes, topo, algo=algo)
    assert simulate(topo, op, algo, nbytes) == pytest.approx(want, rel=REL)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_tree_closed_form_equals_simulator_unpipelined(n: int, shared: bool) -> None:
    topo = Topo.uniform(n, 40.0, 4.0, shared=shared)
    assert simulate(topo, "allreduce", "tree", S) == pytest.approx(cost.allreduce_time(S, topo, algo="tree"), rel=REL)


@pytest.mark.parametrize("n", [3, 4, 5, 8])
@pytest.mark.parametrize("op,algo", [("allreduce", "tree"), ("broadcast", "chain")])
def test_pipelined_closed_form_is_an_upper_bound(n: int, op: str, algo: str, shared: bool) -> None:
    # The step-synchronous form charges L every step; the event replay overlaps latency with
    # later chunks, so it can only be faster (and is, once L > 0 and k > 1).
    topo = Topo.uniform(n, 40.0, 4.0, shared=shared)
    closed = cost.collective_time(op, S, topo, algo=algo, chunks=4)
    sim = simulate(topo, op, algo, S, chunks=4)
    assert sim < closed
    assert sim >= cost.p2p_time(S, topo.link) - 1e-12  # but never beats moving S once


def test_simulator_matches_traced_ring() -> None:
    trace = Trace.steps([(0, 50), (0.2, 0), (0.5, 5), (1.0, 80)], loop=True, period_s=1.5)
    topo = Topo(4, Link(None, 3, trace=trace))
    want = cost.allreduce_time(S, topo)
    assert simulate(topo, "allreduce", "ring", S) == pytest.approx(want, rel=REL)


@pytest.mark.parametrize("n", [2, 3, 4, 6, 7, 8])
def test_ccomm_algorithms_are_ccomm_schedules_and_alpha_beta_agrees(n: int) -> None:
    from ccomm import schedule as ccs

    link = Link(100, 75)
    sizes = [1000.0 * (r + 1) for r in range(n)]
    cases = [("allgather", a, known) for a in ("ring", "bruck") + (("doubling",) if n & (n - 1) == 0 else ())
             for known in (True, False)] + [("allreduce", a, True) for a in ("ring", "doubling", "tree")]
    for op, algo, known in cases:
        if op == "allgather":
            steps = cost.schedule(op, n, max(sizes), algo, sizes=sizes, sizes_known=known)
            assert steps == ccs.allgather_schedule(algo, n, sizes, sizes_known=known)
        else:
            steps = cost.schedule(op, n, 4096.0, algo)
            assert steps == ccs.allreduce_schedule(algo, n, 4096.0)
        # netsim's evaluation on a constant shared link is ccomm's alpha-beta time.
        assert cost.schedule_time(Topo(n, link), steps) == pytest.approx(
            ccs.alpha_beta_time(steps, link.latency_s, 100e6 / 8), rel=1e-12)
