"""`ccomm.stats`: counters per key and op, snapshots, the process-wide default, threads.

What the transport records on real process groups is checked in `test_comm.py` against
the tensors actually handed to torch.distributed.
"""
from __future__ import annotations

import threading

import pytest

from ccomm import stats
from ccomm.stats import CommStats, OpStats


def test_record_groups_by_key_and_op() -> None:
    st = CommStats()
    st.record("allgather", "layer1", payload_bytes=100, header_bytes=8, padding_bytes=4)
    st.record("allgather", "layer1", payload_bytes=50)
    st.record("allreduce", "layer1", payload_bytes=7)
    st.record("send_recv", payload_bytes=3)  # no key: recorded under the op name
    snap = st.snapshot()
    assert snap == {
        "layer1": {"allgather": OpStats(2, 150, 8, 4), "allreduce": OpStats(1, 7, 0, 0)},
        "send_recv": {"send_recv": OpStats(1, 3, 0, 0)},
    }
    assert st.get("layer1", "allgather").bytes == 162
    assert st.get("layer1") == OpStats(3, 157, 8, 4)
    assert st.get("missing") == OpStats() and st.get("layer1", "missing") == OpStats()
    assert st.total() == OpStats(4, 160, 8, 4)
    assert st.total("allgather") == OpStats(2, 150, 8, 4)
    assert stats.total(snap, "send_recv") == OpStats(1, 3, 0, 0)


def test_snapshot_is_a_copy_and_reset_clears() -> None:
    st = CommStats()
    st.record("allreduce", payload_bytes=10)
    snap = st.snapshot()
    st.record("allreduce", payload_bytes=10)
    st.record("allgather", payload_bytes=1)
    assert snap == {"allreduce": {"allreduce": OpStats(1, 10, 0, 0)}}
    st.reset()
    assert st.snapshot() == {} and st.total() == OpStats()


def test_opstats_arithmetic_gives_windows() -> None:
    st = CommStats()
    st.record("allgather", "k", payload_bytes=5, header_bytes=8)
    before = st.get("k")
    st.record("allgather", "k", payload_bytes=20, padding_bytes=3)
    window = st.get("k") - before
    assert window == OpStats(1, 20, 0, 3) and window.bytes == 23
    assert before + window == st.get("k")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"payload_bytes": -1}, "payload_bytes"),
        ({"header_bytes": 1.5}, "header_bytes"),
        ({"padding_bytes": True}, "padding_bytes"),
        ({"calls": -2}, "calls"),
        ({"key": 3}, "key"),
    ],
)
def test_record_rejects_bad_values(kwargs: dict, field: str) -> None:
    st = CommStats()
    with pytest.raises(ValueError, match=field):
        st.record("allreduce", **kwargs)
    with pytest.raises(ValueError, match="op"):
        st.record("")
    assert st.snapshot() == {}  # nothing half-recorded


def test_default_instance_and_module_functions() -> None:
    default = stats.default_stats()
    assert stats.resolve(None) is default
    own = CommStats()
    assert stats.resolve(own) is own
    with pytest.raises(ValueError, match="stats"):
        stats.resolve({})  # type: ignore[arg-type]
    stats.reset()
    default.record("allgather", "test-stats-key", payload_bytes=11)
    assert stats.snapshot() == {"test-stats-key": {"allgather": OpStats(1, 11, 0, 0)}}
    stats.reset()
    assert stats.snapshot() == {}


#: Threads x records per thread: enough interleaving that an unlocked read-modify-write
#: of the counters loses updates in practice.
THREADS, PER_THREAD = 8, 5000


def test_concurrent_records_are_not_lost() -> None:
    st = CommStats()
    start = threading.Barrier(THREADS)

    def work(i: int) -> None:
        start.wait()
        for j in range(PER_THREAD):
            st.record("allgather", f"k{j % 3}", payload_bytes=i + 1, header_bytes=1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tot = st.total()
    assert tot.calls == THREADS * PER_THREAD
    assert tot.header_bytes == THREADS * PER_THREAD
    assert tot.payload_bytes == PER_THREAD * sum(range(1, THREADS + 1))


def test_counts_per_algorithm() -> None:
    st = CommStats()
    st.record("allgather", "a", payload_bytes=10, algo="ring")
    st.record("allgather", "b", payload_bytes=5, header_bytes=16, algo="bruck")
    st.record("allgather", "b", payload_bytes=5, algo="bruck")
    st.record("send_recv", "c", payload_bytes=3)  # no algorithm named: not in by_algo
    assert st.by_algo() == {("allgather", "ring"): OpStats(1, 10, 0, 0), ("allgather", "bruck"): OpStats(2, 10, 16, 0)}
    assert st.by_algo("a") == {("allgather", "ring"): OpStats(1, 10, 0, 0)}
    # The per-key, per-op view is unchanged by the algorithm.
    assert st.get("b", "allgather") == OpStats(2, 10, 16, 0)
    with pytest.raises(ValueError, match="algo"):
        st.record("allgather", algo="")
    st.reset()
    assert st.by_algo() == {}
