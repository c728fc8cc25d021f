"""Log-depth collectives of `ccomm.comm` and their schedules (`ccomm.schedule`).

Pure tests check the plans (every rank ends with every block / every contribution exactly
once, a rank only forwards what it holds), the alpha-beta closed forms and ``auto``'s
choices. Multiprocess tests run one 8-rank gloo pool with sub-groups of 2..8 ranks and
compare every log-depth result with the ring's bit for bit, and the messages each rank
really sends (through the test-only send hook) with `ccomm.schedule`.
"""
from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist

from ccomm import Payload, PayloadMeta
from ccomm import schedule as S
from ccomm.comm import (
    AutoConfig,
    CommError,
    CommHandle,
    CommTimeoutError,
    allgather_payloads,
    allreduce_payload,
    clear_measured,
    configure,
    set_measured,
)
from ccomm.comm import p2p
from ccomm.comm.auto import resolve_algo
from ccomm.ranks import RankPool, run_ranks
from ccomm.stats import CommStats

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GATHER_ALGOS = ("ring", "doubling", "bruck")
REDUCE_ALGOS = ("ring", "doubling", "tree")
POOL_N = 8
SIZES_N = tuple(range(2, POOL_N + 1))


def _gather_algos(n: int) -> tuple[str, ...]:
    return tuple(a for a in GATHER_ALGOS if a != "doubling" or n & (n - 1) == 0)


def _var_numel(rank: int) -> int:
    """Differing block sizes, with empty blocks at ranks 0 and 5."""
    return (rank * 7) % 5 * 3


# ============================================================================ pure: plans
@pytest.mark.parametrize("n", range(1, 17))
def test_allgather_rounds_deliver_every_block_forwarding_only_held_ones(n: int) -> None:
    for algo in _gather_algos(n):
        held = [{r} for r in range(n)]
        for k, rnd in enumerate(S.allgather_rounds(algo, n)):
            assert sorted(t.src for t in rnd) == list(range(n)), (algo, k)
            new = [set(h) for h in held]
            for t in rnd:
                assert set(t.blocks) <= held[t.src], (algo, n, k, t)  # only what it holds
                assert not set(t.blocks) & held[t.dst], (algo, n, k, t)  # nothing twice
                new[t.dst] |= set(t.blocks)
            held = new
        assert held == [set(range(n))] * n, (algo, n)
        if algo != "ring":
            assert len(S.allgather_rounds(algo, n)) == math.ceil(math.log2(n)) if n > 1 else True


@pytest.mark.parametrize("n", range(1, 17))
def test_allreduce_rounds_sum_every_contribution_once(n: int) -> None:
    for algo in ("doubling", "tree"):
        # Each rank's value as a multiset of contributions: one of every rank at the end.
        val = [[0] * n for _ in range(n)]
        for r in range(n):
            val[r][r] = 1
        for action, rnd in S.allreduce_rounds(algo, n):
            incoming: dict[int, list[list[int]]] = {}
            for t in rnd:
                incoming.setdefault(t.dst, []).append(list(val[t.src]))
            for dst, msgs in incoming.items():
                for m in msgs:
                    val[dst] = [a + b for a, b in zip(val[dst], m)] if action == "add" else m
        assert val == [[1] * n] * n, (algo, n, val)


def test_schedules_have_the_closed_forms() -> None:
    L, B, s = 0.075, 12.5e6, 65536.0
    for n in range(2, 17):
        lg = math.ceil(math.log2(n))
        ring = S.alpha_beta_time(S.allgather_schedule("ring", n, [s] * n), L, B)
        bruck = S.alpha_beta_time(S.allgather_schedule("bruck", n, [s] * n), L, B)
        assert ring == pytest.approx((n - 1) * (L + s / B))
        assert bruck == pytest.approx(lg * L + (n - 1) * s / B)
        assert S.received(S.allgather_schedule("bruck", n, [s] * n)) == (n - 1) * s
        ar = S.alpha_beta_time(S.allreduce_schedule("ring", n, s), L, B)
        assert ar == pytest.approx(2 * (n - 1) * (L + s / n / B))
        p = 1 << (n.bit_length() - 1)
        dbl = S.alpha_beta_time(S.allreduce_schedule("doubling", n, s), L, B)
        assert dbl == pytest.approx((int(math.log2(p)) + 2 * (p != n)) * (L + s / B))
    # Unknown (or checked) sizes: the ring pays a second chain of n-1 latencies and pads to
    # the largest; log-depth adds a wire header (120 bytes) per forwarded block in the same rounds.
    h = S.HEADER_BYTES
    assert h == 120
    sizes = [float(_var_numel(r)) for r in range(6)]
    ring_u = S.allgather_schedule("ring", 6, sizes, sizes_known=False)
    assert len(ring_u) == 10 and S.received(ring_u) == 5 * h + 5 * max(sizes)
    bruck_u = S.allgather_schedule("bruck", 6, sizes, sizes_known=False)
    assert len(bruck_u) == 3 and S.received(bruck_u) == 5 * h + sum(sizes) - sizes[0]
    assert len(S.allgather_schedule("bruck", 6, sizes, sizes_known=False, pipelined=False)) == 6


def test_auto_choices_follow_the_model() -> None:
    # The scenario: latency dominates, log-depth wins.
    assert S.choose("allgather", 8, 65536, 0.075, 12.5e6) == "doubling"
    assert S.choose("allgather", 7, 65536, 0.075, 12.5e6) == "bruck"
    # Bandwidth dominates: the predicted gain is below min_gain, so the ring stays.
    assert S.choose("allgather", 8, 64 << 20, 1e-4, 1.25e8) == "ring"
    assert S.choose("allreduce", 8, 64 << 20, 1e-4, 1.25e8) == "ring"
    assert S.choose("allreduce", 8, 1024, 0.075, 12.5e6) in ("doubling", "tree")
    # Unknown sizes: log-depth whatever the size; two ranks with known sizes: ring.
    assert S.choose("allgather", 6, 64 << 20, 1e-4, 1.25e8, sizes_known=False) == "bruck"
    assert S.choose("allgather", 2, 1, 1.0, 1.0) == "ring"
    # Sub-millisecond latency, tiny messages: the saved latencies are below the rounds'
    # software cost, so the ring stays; without that cost the model alone picks log-depth.
    assert S.choose("allgather", 8, 1024, 1e-4, 12.5e6) == "ring"
    assert S.choose("allgather", 8, 1024, 1e-4, 12.5e6, overhead_s=0.0) == "doubling"


def test_auto_uses_measured_then_configured_link() -> None:
    previous = configure(AutoConfig(latency_s=0.0, bandwidth_Bps=1.25e9))
    try:
        assert resolve_algo("allgather", "auto", None, 8, 65536) == "ring"  # no latency to save
        set_measured(None, 0.075, 12.5e6)
        assert resolve_algo("allgather", "auto", None, 8, 65536) == "doubling"
        clear_measured(None)
        assert resolve_algo("allgather", "auto", None, 8, 65536) == "ring"
        assert resolve_algo("allgather", "bruck", None, 8, 65536) == "bruck"  # forced
    finally:
        configure(previous)
        clear_measured(every=True)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: resolve_algo("allgather", "tree", None, 4, 8), "algo='tree' must be one of"),
        (lambda: resolve_algo("allgather", "doubling", None, 6, 8), "power-of-two"),
        (lambda: resolve_algo("allreduce", "bruck", None, 4, 8), "algo='bruck' must be one of"),
        (lambda: AutoConfig(latency_s=-1.0), "latency_s"),
        (lambda: AutoConfig(bandwidth_Bps=0.0), "bandwidth_Bps"),
        (lambda: AutoConfig(min_gain=1.0), "min_gain"),
        (lambda: AutoConfig(round_overhead_s=-1e-3), "round_overhead_s"),
        (lambda: S.choose("allgather", 4, 8, 0.1, 1.0, overhead_s=float("inf")), "overhead_s"),
        (lambda: set_measured(None, 0.1, float("nan")), "bandwidth_Bps"),
        (lambda: S.allgather_schedule("bruck", 3, [1.0, 2.0]), "sizes"),
        (lambda: S.choose("allreduce", 4, 8, 0.1, 1.0, sizes_known=False), "sizes_known"),
    ],
)
def test_bad_arguments_name_the_field(call: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ============================================================================ multiprocess
@pytest.fixture(scope="module")
def pool8() -> Iterator[RankPool]:
    p = RankPool(POOL_N, group_timeout_s=60.0, name="ccomm-coll")
    yield p
    p.close()


def _groups() -> dict[int, dist.ProcessGroup]:
    # new_group is collective over the world: every rank creates every sub-group.
    return {n: dist.new_group(list(range(n))) for n in SIZES_N}


def _payload(x: torch.Tensor) -> Payload:
    # One tensor shape on every rank (the wire header checks it); buffer sizes may differ,
    # as a variable-size codec's do.
    return Payload(x, PayloadMeta(torch.Size([1]), x.dtype))


def _r_equivalence(rank: int, world: int) -> dict[Any, Any]:
    """Per (n, dtype, same_size, algo): does every gathered block equal the ring's, bit for bit?"""
    out: dict[Any, Any] = {}
    for n, g in _groups().items():
        if rank >= n:
            continue
        for dtype in DTYPES:
            gen = torch.Generator().manual_seed(100 * n + rank)
            for same_size in (True, False):
                numel = 11 if same_size else _var_numel(rank)
                x = torch.randn(numel, generator=gen).to(dtype)
                ring = allgather_payloads(_payload(x), g, same_size=same_size, algo="ring")
                for algo in _gather_algos(n)[1:]:
                    got = allgather_payloads(_payload(x), g, same_size=same_size, algo=algo)
                    out[("gather", n, dtype, same_size, algo)] = len(got) == n and all(
                        a.buffer.dtype == b.buffer.dtype and torch.equal(a.buffer.view(torch.uint8), b.buffer.view(torch.uint8))
                        for a, b in zip(ring, got)
                    )
            # All-reduce: integers are summed exactly in every order, so the log-depth result
            # must equal the ring's bits; random values must give the same bits on every rank.
            ints = torch.randint(-50, 50, (13,), generator=gen).to(dtype)
            rnd = torch.randn(13, generator=gen).to(dtype)
            ring_ints = allreduce_payload(_payload(ints.clone()), g, algo="ring").buffer
            ring_rnd = allreduce_payload(_payload(rnd.clone()), g, algo="ring").buffer
            for algo in REDUCE_ALGOS[1:]:
                got_ints = allreduce_payload(_payload(ints.clone()), g, algo=algo).buffer
                got_rnd = allreduce_payload(_payload(rnd.clone()), g, algo=algo).buffer
                out[("reduce_exact", n, dtype, algo)] = torch.equal(got_ints, ring_ints)
                out[("reduce_bits", n, dtype, algo)] = got_rnd.view(torch.int16 if dtype != torch.float32 else torch.int32)
                out[("reduce_close", n, dtype, algo)] = torch.allclose(got_rnd.float(), ring_rnd.float(), rtol=2e-2, atol=2e-2)
    return out


@pytest.mark.multiprocess
def test_log_depth_results_bit_identical_to_ring(pool8: RankPool) -> None:
    res = pool8.run(_r_equivalence, timeout=600.0)
    checked = 0
    for rank, me in enumerate(res):
        for k, v in me.items():
            if k[0] == "reduce_bits":
                # Same bits on every rank of the group.
                assert torch.equal(v, res[0][k]), (rank, k)
            else:
                assert v is True, (rank, k)
            checked += 1
    # Every group size, dtype and algorithm was covered on every member rank.
    per_rank_n = {n: len(DTYPES) * (2 * (len(_gather_algos(n)) - 1) + 3 * 2) for n in SIZES_N}
    assert checked == sum(n * per_rank_n[n] for n in SIZES_N)


def _r_trace(rank: int, world: int) -> dict[Any, Any]:
    """The messages this rank sends in each log-depth collective, and its stats."""
    out: dict[Any, Any] = {}
    for n, g in _groups().items():
        if rank >= n:
            continue
        for op, algo, same_size, check in [
            ("gather", a, s, c) for a in _gather_algos(n)[1:] for s, c in ((True, False), (False, True), (True, True))
        ] + [("reduce", a, True, False) for a in REDUCE_ALGOS[1:]]:
            sent: list[tuple[int, int, int, int]] = []
            previous = p2p.set_send_hook(lambda *m: sent.append(m))
            st = CommStats()
            try:
                if op == "gather":
                    x = torch.arange(11 if same_size else _var_numel(rank), dtype=torch.float16)
                    handle = allgather_payloads(_payload(x), g, same_size=same_size, algo=algo, check=check,
                                                async_op=True, key="k", stats=st)
                else:
                    x = torch.ones(10, dtype=torch.float32)
                    handle = allreduce_payload(_payload(x), g, algo=algo, check=check, async_op=True, key="k",
                                               stats=st)
                assert isinstance(handle, CommHandle)
                handle.get_future().wait()
            finally:
                p2p.set_send_hook(previous)
            out[(n, op, algo, same_size, check)] = {"sent": sent, "stats": st.by_algo("k"), "nbytes": x.numel() * 2
                                             if op == "gather" else 40}
    return out


@pytest.mark.multiprocess
def test_schedule_equals_trace_of_sends(pool8: RankPool) -> None:
    res = pool8.run(_r_trace, timeout=600.0)
    for key in res[0]:
        n, op, algo, same_size, check = key
        sizes_known = same_size and not check  # checked calls carry wire headers like unknown sizes
        members = res[:n]
        trace: dict[int, list[tuple[int, int, float]]] = {}
        for me in members:
            for step, src, dst, nbytes in me[key]["sent"]:
                trace.setdefault(step, []).append((src, dst, float(nbytes)))
        if op == "gather":
            sizes = [2.0 * (11 if same_size else _var_numel(r)) for r in range(n)]
            expected = S.allgather_schedule(algo, n, sizes, sizes_known=sizes_known)
        else:
            expected = S.allreduce_schedule(algo, n, 40.0)
        want = {k: sorted(step) for k, step in enumerate(expected) if step}
        assert {k: sorted(v) for k, v in trace.items()} == want, key
        # Stats: one call per rank under (op, algo), own payload bytes, every header byte sent.
        for rank, me in enumerate(members):
            name = "allgather" if op == "gather" else "allreduce"
            st = me[key]["stats"][(name, algo)]
            assert st.calls == 1 and list(me[key]["stats"]) == [(name, algo)], key
            assert st.payload_bytes == me[key]["nbytes"], key
            if op == "gather":
                assert st.header_bytes == (0 if sizes_known else S.HEADER_BYTES * sum(
                    len(t.blocks) for rnd in S.allgather_rounds(algo, n) for t in rnd if t.src == rank)), key


# ---------------------------------------------------------------------------- failures
#: The sub-groups' timeout: their connection must also finish within it (a group's p2p waits
#: keep the timeout it was made with), so it leaves room for a rank descheduled on a busy host.
FAIL_TIMEOUT_S = 4.0
SLACK_S = 6.0


def _r_silent(rank: int, world: int) -> dict[str, Any] | None:
    timeout = datetime.timedelta(seconds=FAIL_TIMEOUT_S)
    dist.barrier()  # the ranks reach the short-timeout connection together
    g_ring = dist.new_group([0, 1, 2], timeout=timeout)
    g_log = dist.new_group([0, 1, 2], timeout=timeout)
    dist.barrier()
    if rank == 2:
        return None  # alive, but never takes part: the others can only end by the timeout
    p = _payload(torch.ones(8))
    out: dict[str, Any] = {}
    for name, call in (
        ("ring", lambda: allgather_payloads(p, g_ring, same_size=True, algo="ring")),
        ("bruck", lambda: allgather_payloads(p, g_log, same_size=False, algo="bruck")),
    ):
        t0 = time.monotonic()
        try:
            call()
            out[name] = ("no error", 0.0)
        except CommError as exc:
            out[name] = (type(exc).__name__, time.monotonic() - t0)
    return out


def _r_dies_mid_collective(rank: int, world: int) -> dict[str, Any] | None:
    timeout = datetime.timedelta(seconds=FAIL_TIMEOUT_S)
    dist.barrier()
    g_log = dist.new_group([0, 1, 2], timeout=timeout)
    dist.barrier()
    if rank == 1:
        # Dies in the middle: after its round-0 messages, before round 1.
        p2p.set_send_hook(lambda step, *_: os._exit(0) if step == 1 else None)
    p = _payload(torch.ones(8))
    t0 = time.monotonic()
    try:
        allgather_payloads(p, g_log, same_size=True, algo="bruck")
        return {"error": "no error", "elapsed": 0.0}
    except CommError as exc:
        return {"error": type(exc).__name__, "elapsed": time.monotonic() - t0, "msg": str(exc)}


@pytest.mark.multiprocess
def test_silent_and_dead_peers_raise_like_the_ring() -> None:
    res = run_ranks(_r_silent, 3, timeout=120.0, group_timeout_s=30.0)
    for me in res[:2]:
        assert me["ring"][0] == me["bruck"][0] == CommTimeoutError.__name__, me
        for _, elapsed in me.values():
            assert FAIL_TIMEOUT_S * 0.9 <= elapsed <= FAIL_TIMEOUT_S + SLACK_S, me
    res = run_ranks(_r_dies_mid_collective, 3, timeout=120.0, group_timeout_s=30.0, may_exit={1})
    assert res[1] is None
    for me in (res[0], res[2]):
        assert me["error"] in (CommError.__name__, CommTimeoutError.__name__), me
        assert "allgather_payloads" in me["msg"] and "algo='bruck'" in me["msg"], me
        assert me["elapsed"] <= FAIL_TIMEOUT_S + SLACK_S, me
