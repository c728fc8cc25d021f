"""Payload transport (`ccomm.comm`) on real gloo process groups.

Rank functions (`_r_*`) run inside `RankPool` subprocesses and return plain data; the
assertions that compare ranks run in the parent. Every rank function records, through
`_Spy`, the tensors it hands to torch.distributed, so byte counts are checked against
what really went to the backend, not only against `ccomm.stats`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist

from ccomm.header import HEADER_BYTES
from ccomm import Payload, PayloadMeta, available_codecs, make_codec
from ccomm.comm import (
    CommError,
    CommHandle,
    CommTimeoutError,
    allgather_payloads,
    allreduce_payload,
    decode_sum,
    send_recv,
)
from ccomm.stats import CommStats

from ccomm.ranks import RankError, RankPool, run_ranks
from _timing import on_time

CHAIN = "randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4"
#: An additive chain (index-free sparsifier + additive cast), so all-reduce is legal.
ADDITIVE_CHAIN = "randomk:ratio=0.25|fp16"
SPECS = [*available_codecs(), CHAIN]
ADDITIVE_SPECS = [s for s in [*SPECS, ADDITIVE_CHAIN] if make_codec(s).additive]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: (tokens, channels): 2-D so the activation codecs (binary, int2, lowrank) see a matrix.
SHAPE = (48, 40)


# -- harness ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[Callable[[int], RankPool]]:
    """`pool(n)`: a live n-rank pool shared by the module, restarted after a failure."""
    pools: dict[int, RankPool] = {}

    def get(n: int) -> RankPool:
        p = pools.get(n)
        if p is None or p.broken:
            p = pools[n] = RankPool(n, group_timeout_s=30.0)
        return p

    yield get
    for p in pools.values():
        p.close()


class _Spy:
    """Records the bytes of every tensor this rank hands to torch.distributed to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.recv: list[tuple[str, int]] = []
        self._orig: dict[str, Any] = {}

    def __enter__(self) -> "_Spy":
        self._orig = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "batch_isend_irecv")}
        orig = self._orig

        def all_reduce(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.sent.append(("all_reduce", _nb(tensor)))
            return orig["all_reduce"](tensor, *a, **k)

        def all_gather(out: list[torch.Tensor], tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.sent.append(("all_gather", _nb(tensor)))
            return orig["all_gather"](out, tensor, *a, **k)

        def batch_isend_irecv(ops: list[dist.P2POp]) -> Any:
            for op in ops:
                (self.sent if op.op is dist.isend else self.recv).append(("p2p", _nb(op.tensor)))
            return orig["batch_isend_irecv"](ops)

        dist.all_reduce, dist.all_gather, dist.batch_isend_irecv = all_reduce, all_gather, batch_isend_irecv
        return self

    def __exit__(self, *exc: object) -> None:
        for n, f in self._orig.items():
            setattr(dist, n, f)

    @property
    def sent_bytes(self) -> int:
        return sum(b for _, b in self.sent)


def _nb(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _input(rank: int, dtype: torch.dtype, shape: tuple[int, ...] = SHAPE, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * salt + rank)
    return torch.randn(shape, generator=g).to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a 1-D buffer (compares NaNs and signed zeros exactly)."""
    return t.contiguous().view(torch.uint8).clone()


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


# -- every codec through all-gather ---------------------------------------------------------


def _r_gather_codec(rank: int, world: int, spec: str) -> list[dict[str, Any]]:
    out = []
    for dtype in DTYPES:
        for same_size in sorted({make_codec(spec).fixed_size, False}):
            codec = make_codec(spec)  # fresh per call: seeded codecs draw identically on every rank
            x = _input(rank, dtype)
            p = codec.encode(x)
            st = CommStats()
            key = f"{spec}/{dtype}/{same_size}"
            with _Spy() as spy:
                got = allgather_payloads(p, same_size=same_size, algo="ring", key=key, stats=st)
            out.append(
                {
                    "dtype": dtype,
                    "same_size": same_size,
                    "x": x,
                    "own": _bytes(p.buffer),
                    "nbytes": p.nbytes,
                    "bound": codec.nbytes(x.shape, dtype),
                    "decoded": codec.decode(p),
                    "received": [_bytes(q.buffer) for q in got],
                    "received_nbytes": [q.nbytes for q in got],
                    "sum": decode_sum(codec, got),
                    "stats": st.get(key, "allgather"),
                    "stats_total": st.total(),
                    "spy_sent": list(spy.sent),
                }
            )
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("spec", SPECS)
def test_allgather_every_codec_bytes_and_sum(pool: Callable[[int], RankPool], spec: str) -> None:
    r0, r1 = pool(2).run(_r_gather_codec, spec)
    for c0, c1 in zip(r0, r1):
        ranks = (c0, c1)
        for me in ranks:
            # What this rank handed to torch.distributed == what ccomm.stats recorded.
            assert me["stats"].calls == 1
            assert me["stats_total"] == me["stats"]
            assert sum(b for _, b in me["spy_sent"]) == me["stats"].bytes
            assert me["stats"].payload_bytes == me["nbytes"] == me["own"].numel()
            # Wire headers (ccomm.header) go first, with same_size=True too (check=True).
            assert me["spy_sent"] == [("all_gather", HEADER_BYTES), ("all_gather", me["nbytes"])]
            assert (me["stats"].header_bytes, me["stats"].padding_bytes) == (HEADER_BYTES, 0)
            # ... and what every receiver got is exactly the sender's buffer.
            for r, sender in enumerate(ranks):
                assert me["received_nbytes"][r] == sender["nbytes"]
                assert torch.equal(me["received"][r], sender["own"])
            if make_codec(spec).fixed_size:
                assert me["nbytes"] == me["bound"]
        # decode_sum == rank-order sum of what each rank decoded itself (fp32 accumulation).
        ref = (c0["decoded"].float() + c1["decoded"].float()).to(c0["dtype"])
        for me in ranks:
            assert me["sum"].dtype == c0["dtype"] and me["sum"].shape == c0["x"].shape
            assert torch.equal(me["sum"], ref)
        # ... and within the codec's own error of the dense sum: by the triangle inequality
        # |sum_r dec_r - sum_r x_r| <= sum_r |dec_r - x_r|, plus the rounding of the final
        # cast (eps * |result|) and of the dense fp32 sum (eps32 * sum |x_r|).
        dense = c0["x"].float() + c1["x"].float()
        err = (c0["sum"].float() - dense).abs()
        codec_err = (c0["decoded"].float() - c0["x"].float()).abs() + (c1["decoded"].float() - c1["x"].float()).abs()
        slack = _eps(c0["dtype"]) * c0["sum"].float().abs() + _eps(torch.float32) * (
            c0["x"].float().abs() + c1["x"].float().abs()
        )
        assert bool((err <= codec_err + slack).all()), f"max excess {float((err - codec_err - slack).max())}"


# -- additive codecs through all-reduce -----------------------------------------------------


def _r_reduce_codec(rank: int, world: int, spec: str) -> list[dict[str, Any]]:
    out = []
    for dtype in DTYPES:
        codec = make_codec(spec)
        x = _input(rank, dtype, salt=1)
        p = codec.encode(x)
        own = p.buffer.clone()
        dense = x.clone()
        dist.all_reduce(dense)
        st = CommStats()
        with _Spy() as spy:
            res = allreduce_payload(p, stats=st)
        assert res is p  # in place
        out.append(
            {
                "dtype": dtype,
                "x": x,
                "own": own,
                "decoded_own": codec.decode(p.with_buffer(own)),
                "reduced": p.buffer.clone(),
                "decoded": codec.decode(p),
                "dense": dense,
                "stats": st.get("allreduce"),
                "spy_sent": list(spy.sent),
            }
        )
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("spec", ADDITIVE_SPECS)
def test_allreduce_additive_codecs(pool: Callable[[int], RankPool], spec: str) -> None:
    r0, r1 = pool(2).run(_r_reduce_codec, spec)
    for c0, c1 in zip(r0, r1):
        for me in (c0, c1):
            nbytes = _nb(me["own"])
            # The wire headers first (check=True; algo "auto" is the ring for two ranks).
            assert me["spy_sent"] == [("all_gather", HEADER_BYTES), ("all_reduce", nbytes)]
            assert (me["stats"].calls, me["stats"].bytes, me["stats"].payload_bytes) == (1, nbytes + HEADER_BYTES, nbytes)
            # With two ranks the backend's sum is one addition in the wire dtype: exact.
            assert torch.equal(me["reduced"], c0["own"] + c1["own"])
            assert torch.equal(me["dense"], c0["dense"])
        # Decoded all-reduce vs dense all-reduce of the inputs: the codec errors of the two
        # ranks add up (triangle inequality); the wire sum rounds once (eps_wire * |sum of
        # decodes|) and the dense sum once (eps_in * |dense|). eps is twice the unit
        # roundoff, so each term is a safe over-estimate.
        wire = c0["own"].dtype
        err = (c0["decoded"].float() - c0["dense"].float()).abs()
        codec_err = sum((c["decoded_own"].float() - c["x"].float()).abs() for c in (c0, c1))
        slack = _eps(wire) * (c0["decoded_own"].float().abs() + c1["decoded_own"].float().abs()) + _eps(
            c0["dtype"]
        ) * (c0["dense"].float().abs() + c0["decoded"].float().abs())
        assert bool((err <= codec_err + slack).all()), f"max excess {float((err - codec_err - slack).max())}"


def test_allreduce_refuses_packed_payloads() -> None:
    # Refused before any communication, so no process group is needed.
    p = make_codec("sign").encode(torch.randn(100))
    assert p.buffer.dtype == torch.uint8
    with pytest.raises(ValueError, match="allgather_payloads"):
        allreduce_payload(p)
    for dtype in (torch.int8, torch.bool):
        with pytest.raises(ValueError, match="allgather_payloads"):
            allreduce_payload(Payload(torch.zeros(4, dtype=dtype), p.meta))
    with pytest.raises(ValueError, match="Payload"):
        allreduce_payload(torch.zeros(3))  # type: ignore[arg-type]


# -- variable sizes: size exchange and padding ------------------------------------------------


VAR_SIZES = (0, 5, 17)  # one empty rank, and sizes that differ so padding is needed


def _r_var_sizes(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in (torch.uint8, torch.float32):
        n = VAR_SIZES[rank]
        buf = (torch.arange(n) * 7 + rank * 31).to(dtype)
        p = Payload(buf, PayloadMeta(torch.Size([max(VAR_SIZES)]), torch.float32))  # one shape, sizes differ
        st = CommStats()
        with _Spy() as spy:
            got = allgather_payloads(p, same_size=False, algo="ring", stats=st)
        out[str(dtype)] = {
            "own": buf,
            "got": [q.buffer for q in got],
            "metas": [q.meta is p.meta for q in got],
            "stats": st.get("allgather", "allgather"),
            "spy": spy.sent_bytes,
        }
    return out


@pytest.mark.multiprocess
def test_allgather_uneven_sizes_three_ranks(pool: Callable[[int], RankPool]) -> None:
    res = pool(3).run(_r_var_sizes)
    for dtype, esize in ((torch.uint8, 1), (torch.float32, 4)):
        per_rank = [r[str(dtype)] for r in res]
        for rank, me in enumerate(per_rank):
            assert all(me["metas"])  # wrapped with the local meta
            for r, sender in enumerate(per_rank):
                assert me["got"][r].dtype == dtype
                assert me["got"][r].numel() == VAR_SIZES[r]
                assert torch.equal(me["got"][r], sender["own"])
            st = me["stats"]
            assert st.payload_bytes == VAR_SIZES[rank] * esize
            assert st.header_bytes == HEADER_BYTES
            assert st.padding_bytes == (max(VAR_SIZES) - VAR_SIZES[rank]) * esize
            assert st.bytes == me["spy"]


def _r_approx_topk(rank: int, world: int) -> dict[str, Any]:
    # 256*256 elements is above approx_topk's exact-selection cutoff, so the sampled
    # threshold path runs; payloads go through the size exchange.
    codec = make_codec("approx_topk:ratio=0.01")
    x = _input(rank, torch.float32, (256, 256), salt=2)
    p = codec.encode(x)
    st = CommStats()
    with _Spy() as spy:
        got = allgather_payloads(p, key="grad", algo="ring", stats=st)
    same = allgather_payloads(p, same_size=True, stats=st)
    return {
        "x": x,
        "nbytes": p.nbytes,
        "decoded": codec.decode(p),
        "received_nbytes": [q.nbytes for q in got],
        "sum": decode_sum(codec, got),
        "sum_same": decode_sum(codec, same),
        "stats": st.get("grad"),
        "spy": spy.sent_bytes,
    }


@pytest.mark.multiprocess
def test_approx_topk_through_size_exchange(pool: Callable[[int], RankPool]) -> None:
    res = pool(3).run(_r_approx_topk)
    sizes = [r["nbytes"] for r in res]
    for me in res:
        assert me["received_nbytes"] == sizes
        st = me["stats"]
        assert (st.calls, st.payload_bytes, st.header_bytes) == (1, me["nbytes"], HEADER_BYTES)
        assert st.padding_bytes == max(sizes) - me["nbytes"]
        assert st.bytes == me["spy"]
        ref = res[0]["decoded"] + res[1]["decoded"] + res[2]["decoded"]
        assert torch.equal(me["sum"], ref)
        assert torch.equal(me["sum_same"], ref)


# -- ring send/recv ------------------------------------------------------------------------------


def _r_ring(rank: int, world: int) -> dict[str, Any]:
    dst, src = (rank + 1) % world, (rank - 1) % world
    buf = torch.arange(3 * (rank + 1), dtype=torch.float32) + 100 * rank
    # One tensor shape on every rank (what the wire header checks), payloads of different
    # sizes, as a variable-size codec gives.
    p = Payload(buf, PayloadMeta(torch.Size([9]), torch.float32))
    st = CommStats()
    out: dict[str, Any] = {"own": buf}
    with _Spy() as spy:
        q = send_recv(p, dst, src, stats=st, key="ring")
    out["sized"] = q.buffer
    out["sized_meta_is_local"] = q.meta is p.meta
    out["sized_stats"] = st.get("ring")
    out["sized_spy"] = (spy.sent_bytes, [b for _, b in spy.recv])
    # Known size, unchecked: no header.
    st2 = CommStats()
    src_bytes = 3 * (src + 1) * 4
    with _Spy() as spy2:
        q2 = send_recv(p, dst, src, recv_nbytes=src_bytes, check=False, stats=st2)
    out["known"] = q2.buffer
    out["known_stats"] = st2.get("send_recv")
    out["known_spy"] = spy2.sent_bytes
    # Reinterpreting dtype: receive the float32 bytes as uint8.
    q3 = send_recv(p, dst, src, recv_dtype=torch.uint8, stats=st2)
    out["as_bytes"] = q3.buffer
    # Reversed ring direction.
    out["reverse"] = send_recv(p, src, dst, stats=st2).buffer
    # A sub-group whose group ranks differ from global ranks: members are global 1 and 2.
    sub = dist.new_group([1, 2])
    if rank in (1, 2):
        other = 1 - dist.get_rank(sub)
        out["sub"] = send_recv(p, other, other, group=sub, stats=st2).buffer
    # A group of one: a ring of one sends nothing.
    solo = dist.new_group([0])
    if rank == 0:
        st3 = CommStats()
        q4 = send_recv(p, 0, 0, group=solo, stats=st3)
        out["solo"] = (torch.equal(q4.buffer, buf), q4.buffer.data_ptr() != buf.data_ptr(), st3.get("send_recv"))
    return out


@pytest.mark.multiprocess
def test_send_recv_ring_three_ranks(pool: Callable[[int], RankPool]) -> None:
    res = pool(3).run(_r_ring)
    for rank, me in enumerate(res):
        src, dst = res[(rank - 1) % 3], res[(rank + 1) % 3]
        nbytes = _nb(me["own"])
        assert torch.equal(me["sized"], src["own"])
        assert me["sized_meta_is_local"]
        st = me["sized_stats"]
        assert (st.calls, st.payload_bytes, st.header_bytes, st.padding_bytes) == (1, nbytes, HEADER_BYTES, 0)
        assert me["sized_spy"] == (nbytes + HEADER_BYTES, [HEADER_BYTES, _nb(src["own"])])
        assert torch.equal(me["known"], src["own"])
        assert me["known_stats"].bytes == nbytes == me["known_spy"]
        assert torch.equal(me["as_bytes"], src["own"].view(torch.uint8))
        assert torch.equal(me["reverse"], dst["own"])
    assert torch.equal(res[1]["sub"], res[2]["own"]) and torch.equal(res[2]["sub"], res[1]["own"])
    same, copied, solo_stats = res[0]["solo"]
    assert same and copied and (solo_stats.calls, solo_stats.bytes) == (1, 0)


def _r_send_recv_validation(rank: int, world: int) -> bool:
    p = Payload(torch.zeros(4), PayloadMeta(torch.Size([4]), torch.float32))
    peer = 1 - rank
    with pytest.raises(ValueError, match="dst"):
        send_recv(p, 2, peer)
    with pytest.raises(ValueError, match="src"):
        send_recv(p, peer, -1)
    with pytest.raises(ValueError, match="itself"):
        send_recv(p, rank, peer)
    with pytest.raises(ValueError, match="recv_nbytes"):
        send_recv(p, peer, peer, recv_nbytes=6)  # not a whole number of float32
    return True


@pytest.mark.multiprocess
def test_send_recv_validation(pool: Callable[[int], RankPool]) -> None:
    assert pool(2).run(_r_send_recv_validation) == [True, True]


# -- async handles ---------------------------------------------------------------------------------


def _r_async(rank: int, world: int) -> dict[str, Any]:
    peer = 1 - rank
    codec = make_codec("topk:ratio=0.1")
    x = _input(rank, torch.float32, salt=3)
    p = codec.encode(x)
    dense = Payload(x.reshape(-1).clone(), PayloadMeta(x.shape, x.dtype))
    st = CommStats()
    # Several operations in flight at once, waited for in reverse order.
    h_ar = allreduce_payload(dense, async_op=True, stats=st)
    h_ag = allgather_payloads(p, same_size=True, async_op=True, stats=st)
    h_agv = allgather_payloads(p, async_op=True, stats=st)
    h_sr = send_recv(p, peer, peer, async_op=True, stats=st)
    assert all(isinstance(h, CommHandle) for h in (h_ar, h_ag, h_agv, h_sr))
    sr = h_sr.wait()
    agv = h_agv.wait()
    ag = h_ag.wait()
    ar = h_ar.wait()
    assert h_sr.wait() is sr and h_ar.wait() is ar  # idempotent
    assert all(h.is_completed() for h in (h_ar, h_ag, h_agv, h_sr))
    # Futures: collectives use the backend's futures, gloo p2p a helper thread.
    f_ag = allgather_payloads(p, same_size=True, async_op=True, stats=st).get_future()
    f_sr = send_recv(p, peer, peer, async_op=True, stats=st).get_future()
    h_poll = allreduce_payload(Payload(torch.ones(8), dense.meta), async_op=True, stats=st)
    fut_ag, fut_sr = f_ag.wait(), f_sr.wait()
    deadline = time.monotonic() + 20.0
    while not h_poll.is_completed():  # completes without anyone calling wait()
        assert time.monotonic() < deadline, "async all-reduce never completed"
        time.sleep(0.01)
    fut_done = h_poll.get_future().wait()
    return {
        "x": x,
        "own": p.buffer,
        "ar": ar.buffer,
        "ar_is_input": ar is dense,
        "ag": [q.buffer for q in ag],
        "agv": [q.buffer for q in agv],
        "sr": sr.buffer,
        "fut_ag": [q.buffer for q in fut_ag],
        "fut_sr": fut_sr.buffer,
        "poll": fut_done.buffer,
        "stats": st.snapshot(),
    }


@pytest.mark.multiprocess
def test_async_handles(pool: Callable[[int], RankPool]) -> None:
    r0, r1 = pool(2).run(_r_async)
    total = (r0["x"] + r1["x"]).reshape(-1)
    for rank, me in enumerate((r0, r1)):
        other = (r1, r0)[rank]
        assert me["ar_is_input"] and torch.equal(me["ar"], total)
        for gathered in (me["ag"], me["agv"], me["fut_ag"]):
            assert torch.equal(gathered[0], r0["own"]) and torch.equal(gathered[1], r1["own"])
        assert torch.equal(me["sr"], other["own"]) and torch.equal(me["fut_sr"], other["own"])
        assert torch.equal(me["poll"], torch.full((8,), 2.0))
        # No key given: every call is recorded under its op name.
        calls = {key: {op: s.calls for op, s in per_op.items()} for key, per_op in me["stats"].items()}
        assert calls == {"allreduce": {"allreduce": 2}, "allgather": {"allgather": 3}, "send_recv": {"send_recv": 2}}


# -- failures: a peer that dies or stays silent ------------------------------------------------------

#: Group timeout of the failure tests: short so the tests take seconds.
FAIL_TIMEOUT_S = 2.0
#: Scheduling slack on 2 busy cores between the timeout firing and the error reaching us.
SLACK_S = 5.0
#: A run is judged only if the host's scheduling lag stayed within a fifth of the slack.
LAG_LIMIT_S = SLACK_S / 5


def _r_silent_peer(rank: int, world: int) -> dict[str, float] | None:
    import datetime

    timeout = datetime.timedelta(seconds=FAIL_TIMEOUT_S)
    # The groups connect within their own (short) timeout, so both ranks start together; a
    # group's p2p waits keep the timeout it was made with (set_timeout does not reach them).
    dist.barrier()
    g_coll = dist.new_group([0, 1], timeout=timeout)
    g_p2p = dist.new_group([0, 1], timeout=timeout)
    dist.barrier()
    if rank == 1:
        # Alive but never taking part in the sub-groups: rank 0's calls there can only end
        # by the groups' timeout.
        return None
    p = Payload(torch.ones(16), PayloadMeta(torch.Size([16]), torch.float32))
    out = {}
    for name, call in (
        ("allreduce", lambda: allreduce_payload(p, g_coll)),
        ("send_recv", lambda: send_recv(p, 1, 1, g_p2p, recv_nbytes=64, async_op=True).wait()),
    ):
        t0 = time.monotonic()
        with pytest.raises(CommTimeoutError):
            call()
        out[name] = time.monotonic() - t0
    return out


@pytest.mark.multiprocess
@pytest.mark.timing
def test_silent_peer_times_out(pool: Callable[[int], RankPool]) -> None:
    def once() -> dict[str, float]:
        # Uses sub-groups with a short timeout; the pool is closed after (its sub-groups are broken).
        p = pool(2)
        try:
            return p.run(_r_silent_peer, timeout=60.0)[0]
        finally:
            p.close()

    elapsed = on_time(once, lag_limit_s=LAG_LIMIT_S)
    for name, t in elapsed.items():
        assert FAIL_TIMEOUT_S * 0.9 <= t <= FAIL_TIMEOUT_S + SLACK_S, (name, t)


def _r_dead_peer(rank: int, world: int) -> dict[str, Any]:
    dist.barrier()
    if rank == 1:
        os._exit(0)  # dies without a word, like a crashed worker
    p = make_codec("sign").encode(torch.randn(64))
    t0 = time.monotonic()
    with pytest.raises(CommError) as info:
        allgather_payloads(p, same_size=True)
    return {"elapsed": time.monotonic() - t0, "error": type(info.value).__name__}


@pytest.mark.multiprocess
@pytest.mark.timing
def test_dead_peer_raises_instead_of_hanging() -> None:
    r0, r1 = on_time(lambda: run_ranks(_r_dead_peer, 2, timeout=60.0, group_timeout_s=FAIL_TIMEOUT_S, may_exit={1}),
                     lag_limit_s=LAG_LIMIT_S)
    assert r1 is None
    # A closed connection is reported at once; a half-dead one by the group timeout.
    assert r0["elapsed"] <= FAIL_TIMEOUT_S + SLACK_S, r0


# -- decode_sum ------------------------------------------------------------------------------------


def test_decode_sum_rank_order_and_accumulation() -> None:
    codec = make_codec("fp16")
    xs = [torch.full((4,), v, dtype=torch.float16) for v in (2048.0, 1.0, 1.0)]
    ps = [codec.encode(x) for x in xs]
    # In fp16, 2048 + 1 rounds back to 2048 (spacing 2 at 2048); accumulating in fp32 keeps
    # both ones: 2050 is representable.
    assert torch.equal(decode_sum(codec, ps), torch.full((4,), 2050.0, dtype=torch.float16))
    assert decode_sum(codec, ps).dtype == torch.float16
    with pytest.raises(ValueError, match="at least one"):
        decode_sum(codec, [])


def test_decode_sum_matches_sum_of_decodes() -> None:
    codec = make_codec("quantize:bits=4")
    xs = [torch.randn(300, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ps = [codec.encode(x) for x in xs]
    ref = codec.decode(ps[0]) + codec.decode(ps[1]) + codec.decode(ps[2])
    assert torch.equal(decode_sum(codec, ps), ref)


# -- the harness itself: failures on a rank surface in the parent, hangs are killed ------------


def _r_fail_or_hang(rank: int, world: int) -> None:
    if rank == 1:
        raise KeyError("boom on rank 1")
    time.sleep(600)  # rank 0 hangs: the pool must not wait for it past the grace period


def _r_hang(rank: int, world: int) -> None:
    time.sleep(600)


#: Hard deadline of the hang test, and the margin for killing and reaping the children.
HANG_DEADLINE_S, KILL_MARGIN_S = 2.0, 15.0


def _timed_failure(p: RankPool, fn: Callable[..., Any], error: type[BaseException], match: str,
                   timeout: float) -> float:
    """Seconds until ``p.run(fn)`` raised ``error`` matching ``match``."""
    t0 = time.monotonic()
    with pytest.raises(error, match=match):
        p.run(fn, timeout=timeout)
    return time.monotonic() - t0


@pytest.mark.multiprocess
@pytest.mark.timing
def test_harness_reraises_rank_errors_and_kills_hangs(pool: Callable[[int], RankPool]) -> None:
    pools: list[RankPool] = []  # every run breaks its pool: each attempt takes a live one
    elapsed = on_time(lambda: _timed_failure(pools[-1], _r_fail_or_hang, RankError,
                                             r"(?s)--- rank 1 ---.*KeyError: 'boom on rank 1'", 120.0),
                      lag_limit_s=KILL_MARGIN_S / 5, setup=lambda: pools.append(pool(2)))
    # Reported after the grace period, long before rank 0's sleep or the run's timeout.
    assert elapsed < 60.0
    p = pools[-1]
    assert p.broken and not any(p.alive())
    with pytest.raises(RuntimeError, match="start a new pool"):
        p.run(_r_hang)

    elapsed = on_time(lambda: _timed_failure(pools[-1], _r_hang, TimeoutError, r"ranks \[0, 1\]", HANG_DEADLINE_S),
                      lag_limit_s=KILL_MARGIN_S / 5, setup=lambda: pools.append(pool(2)))
    assert elapsed < HANG_DEADLINE_S + KILL_MARGIN_S
    p = pools[-1]
    assert p.broken and not any(p.alive())


# -- CommHandle with stand-in work objects (no process group) ----------------------------------


class _FakeWork:
    """Stands in for a torch.distributed Work: completes or fails on demand."""

    def __init__(self, error: str | None = None, has_future: bool = True) -> None:
        self.error = error
        self.has_future = has_future
        self.waits = 0

    def wait(self) -> bool:
        self.waits += 1
        if self.error is not None:
            raise RuntimeError(self.error)
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> "torch.futures.Future[Any]":
        if not self.has_future:
            raise RuntimeError("Work::getFuture not implemented.")
        fut: torch.futures.Future[Any] = torch.futures.Future()
        if self.error is not None:
            fut.set_exception(RuntimeError(self.error))
        else:
            fut.set_result(None)
        return fut


@pytest.mark.parametrize(
    "message, expected",
    [
        ("[gloo/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation to complete", CommTimeoutError),
        ("Application timeout caused pair closure", CommTimeoutError),
        ("Read error [127.0.0.1]:1234: Connection reset by peer", CommError),
    ],
)
def test_handle_turns_backend_errors_into_comm_errors(message: str, expected: type) -> None:
    finished = []
    h: CommHandle[int] = CommHandle([_FakeWork(), _FakeWork(message)], lambda: finished.append(1) or 1, "op")
    with pytest.raises(expected, match="op: ") as first:
        h.wait()
    assert type(first.value) is expected and isinstance(first.value.__cause__, RuntimeError)
    with pytest.raises(expected) as again:
        h.wait()
    assert again.value is first.value and h.is_completed() and finished == []
    if expected is CommTimeoutError:
        assert isinstance(first.value, TimeoutError)


@pytest.mark.parametrize("has_future", [True, False])
def test_handle_future_result_and_error(has_future: bool) -> None:
    ok: CommHandle[str] = CommHandle([_FakeWork(has_future=has_future)], lambda: "result", "op")
    fut = ok.get_future()
    assert fut is ok.get_future()  # one future per handle
    assert fut.wait() == "result" and ok.wait() == "result"
    bad: CommHandle[str] = CommHandle([_FakeWork("Timed out waiting", has_future=has_future)], lambda: "x", "op")
    with pytest.raises(CommTimeoutError, match="op: Timed out") as info:
        bad.get_future().wait()
    with pytest.raises(CommTimeoutError) as again:
        bad.wait()
    assert again.value is info.value
