"""netsim.emulate: real gloo traffic completes when the link model says.

Unit tests cover the replay, the owned-state exchange and the clocks. Multiprocess tests
(marker ``multiprocess``) run 2 and 4 gloo ranks on loopback and check every operation,
measured from call to wait-return, against the cost model within max(5 %, 2 ms). The links
are slow enough (tens of Mbit/s, 5-20 ms) that loopback transport stays well under half the
model, which emulation needs because it can only add delay. Timing checks take the median
of 3 runs, and are judged only on runs without late ops or host scheduling lag (marker
``timing``, tests/_timing.py): an overloaded host is skipped, never failed.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mp import LazyRanks  # noqa: E402
from _timing import LAG_LIMIT_S, on_time  # noqa: E402

from ccomm.header import HEADER_BYTES  # noqa: E402
from netsim import cost  # noqa: E402
from netsim.emulation._clock import EmuVirtualClock  # noqa: E402
from netsim.emulation._patch import FUNCTIONAL_NAMES, PATCHED_NAMES  # noqa: E402
from netsim.emulation._sched import collective_schedule  # noqa: E402
from netsim.emulation._state import owned_size, pack_owned, replay, unpack_owned  # noqa: E402
from netsim.emulation import LATE_SLACK_S, Emulator, emulate  # noqa: E402
from netsim.model.link import Link  # noqa: E402
from netsim.model.reserve import Reserver  # noqa: E402
from netsim.model.topo import Topo  # noqa: E402
from netsim.model.trace import Trace  # noqa: E402

#: The accuracy target of the design: |measured - model| <= max(REL_TOL * model, ABS_TOL_S).
REL_TOL = 0.05
ABS_TOL_S = 2e-3
#: Ping-pong clock offsets (ranks on different hosts) must agree to within this on one host.
CLOCK_SYNC_TOL_S = 1e-3
#: The handle test's polling interval.
POLL_INTERVAL_S = 1e-3
#: Upper allowance for the tiny DDP model's own backward compute (it overlaps communication).
DDP_COMPUTE_S = 0.05
#: Timing checks use the median of this many runs.
REPEATS = 3

LINK = Link(40, 10)  # 40 Mbit/s, 10 ms one way
NBYTES = 160_000  # 32 ms of serialization at 40 Mbit/s


def _tol(model: float) -> float:
    return max(REL_TOL * model, ABS_TOL_S)


def _late(results: list[Any]) -> float:
    """Late ops over the ranks: each result is a dict with "late_ops" (none: 0) or _job_ops' tuple."""
    return sum((r[2] if isinstance(r, tuple) else r).get("late_ops", 0) for r in results)


def _timed(ranks: LazyRanks, job: Callable[..., Any], *args: Any, timeout_s: float = 60.0,
           lag_limit_s: float = LAG_LIMIT_S) -> list[Any]:
    """``ranks.run(job, *args)`` judged only when the host kept up (tests/_timing.py)."""
    return on_time(lambda: ranks.run(job, *args, timeout_s=timeout_s), _late, lag_limit_s=lag_limit_s,
                   setup=ranks.start)


def _report(title: str, results: list[tuple[dict[str, float], dict[str, float], dict]]) -> None:
    """Print measured vs model per rank and op (shown with ``pytest -s``)."""
    print(f"\n{title}")
    for rank, (meas, model, stats) in enumerate(results):
        for k, m in model.items():
            err = meas[k] - m
            print(f"  rank {rank} {k:24s} model {m * 1e3:7.2f} ms  measured {meas[k] * 1e3:7.2f} ms  "
                  f"error {err * 1e3:+6.2f} ms ({100 * err / m:+5.1f} %)")
        print(f"  rank {rank} {stats}")


def _check(measured: dict[str, float], model: dict[str, float], rank: int, stats: object = None) -> None:
    bad = {k: (measured[k], model[k]) for k in model if abs(measured[k] - model[k]) > _tol(model[k])}
    # stats.late_ops > 0 means the real transport (or a descheduled rank) overran the model.
    assert not bad, f"rank {rank}: measured vs model (s) out of tolerance: {bad}; {stats}"


# ============================================================================ unit tests
def test_replay_ring_allreduce_matches_closed_form() -> None:
    for n in (2, 4):
        res = Reserver(Topo(n, LINK))
        steps = collective_schedule("allreduce", n, [NBYTES] * n)
        out = replay(res, steps, [0.0] * n)
        expected = 2 * (n - 1) * (LINK.latency_s + NBYTES / n * 8 / 40e6)
        assert out.done_s == pytest.approx([expected] * n, rel=1e-9)
        assert out.done_s[0] == pytest.approx(cost.allreduce_time(NBYTES, LINK, n), rel=1e-9)
        assert out.bytes_sent[0] == pytest.approx(2 * (n - 1) * NBYTES / n)


def test_replay_straggler_delays_neighbours_and_is_deterministic() -> None:
    n = 4
    enter = [0.0, 0.0, 0.5, 0.0]
    runs = []
    for _ in range(2):
        res = Reserver(Topo(n, Link(40, 10, jitter_ms=5)), seed=3)
        runs.append(replay(res, collective_schedule("allgather", n, [NBYTES] * n), enter).done_s)
    assert runs[0] == runs[1]
    # Nobody can finish an all-gather before the straggler's block has crossed a link.
    assert min(runs[0]) > 0.5 + LINK.serialization_time(NBYTES) + 0.005
    res = Reserver(Topo(n, LINK))
    alone = replay(res, collective_schedule("allgather", n, [NBYTES] * n), [0.0] * n).done_s
    assert max(alone) < min(runs[0])


def test_replay_shared_uplink_serializes_a_rooted_send() -> None:
    # Broadcast chain from rank 0 on n=2: one message; two broadcasts back to back queue.
    res = Reserver(Topo(2, LINK))
    steps = collective_schedule("broadcast", 2, [NBYTES, NBYTES])
    first = replay(res, steps, [0.0, 0.0]).done_s
    second = replay(res, steps, [0.0, 0.0]).done_s
    ser = LINK.serialization_time(NBYTES)
    assert first == pytest.approx([ser, ser + LINK.latency_s])
    assert second == pytest.approx([2 * ser, 2 * ser + LINK.latency_s])


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("op", ["allreduce", "allgather", "reduce_scatter", "broadcast", "barrier"])
def test_replay_agrees_with_simulator(op: str, shared: bool) -> None:
    # Two implementations of the same rule: emulate's replay on a fresh state and the
    # netsim.model.clock Simulator, on a heterogeneous topology with staggered entries and jitter.
    from _simulator import Simulator

    n = 4
    topo = Topo(n, Link(40, 10, jitter_ms=3), hosts={2: Link(10, 10)}, pairs={(1, 2): Link(40, 25)}, shared=shared)
    enter = [0.0, 0.013, 0.002, 0.031]
    sizes = [NBYTES] * n
    ours = replay(Reserver(topo, seed=5), collective_schedule(op, n, sizes), enter).done_s
    theirs = Simulator(topo, seed=5).collective_times(op, NBYTES, enter_s=enter)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)


def test_barrier_schedule_is_dissemination() -> None:
    assert collective_schedule("barrier", 1, [0.0]) == []
    for n in (2, 3, 4, 5, 8):
        steps = collective_schedule("barrier", n, [0.0] * n)
        assert len(steps) == math.ceil(math.log2(n))
        res = Reserver(Topo(n, LINK))
        assert replay(res, steps, [0.0] * n).done_s == pytest.approx([len(steps) * LINK.latency_s] * n)
    with pytest.raises(ValueError, match="op="):
        collective_schedule("gather", 2, [0.0, 0.0])
    with pytest.raises(ValueError, match="sizes"):
        collective_schedule("barrier", 2, [0.0])


def test_owned_state_round_trip() -> None:
    for shared in (True, False):
        topo = Topo(3, LINK, shared=shared)
        a, b = Reserver(topo), Reserver(topo)
        replay(a, collective_schedule("allreduce", 3, [NBYTES] * 3), [0.0, 0.1, 0.2])
        for r in range(3):
            row = pack_owned(a, r)
            assert len(row) == owned_size(a)
            unpack_owned(b, r, row)
        assert all(pack_owned(a, r) == pack_owned(b, r) for r in range(3))
        with pytest.raises(ValueError, match="values must hold"):
            unpack_owned(b, 0, [0.0])


@pytest.mark.timing
def test_virtual_clock_counts_compute_not_sleep() -> None:
    clock = EmuVirtualClock()
    time.sleep(0.01)
    assert clock.now() >= 0.01  # wall time between calls is the caller's compute
    clock.compute(1.0)
    t = clock.now()
    time.sleep(0.01)
    assert clock.now() == t  # once compute() is used, only it and communication move the clock

    def virtual_sleep() -> tuple[float, float, float]:
        before = clock.now()
        start = time.monotonic()
        clock.sleep_until(before + 100.0)
        return time.monotonic() - start, before, clock.now()

    # Only a host stall of about a second could break the wall bound: judge runs without one.
    wall, before, after = on_time(virtual_sleep, lag_limit_s=0.2)
    assert wall < 1.0
    assert after == before + 100.0
    clock.advance_to(0.0)
    assert clock.now() == after
    with pytest.raises(ValueError, match="seconds"):
        clock.compute(-1.0)


class _FakeInner:
    """A finished real Work whose future holds ``value`` or raises ``error``."""

    def __init__(self, value: object = None, error: BaseException | None = None) -> None:
        self.fut: torch.futures.Future = torch.futures.Future()
        if error is not None:
            self.fut.set_exception(error)
        else:
            self.fut.set_result(value)
        self.error = error

    def is_completed(self) -> bool:
        return True

    def wait(self, timeout: object = None) -> bool:
        if self.error is not None:
            raise self.error
        return True

    def get_future(self) -> torch.futures.Future:
        return self.fut


class _FakeEmu:
    """The parts of an Emulator that work handles use, on a wall clock starting now."""

    def __init__(self) -> None:
        from netsim.emulation._clock import EmuWallClock

        self.clock = EmuWallClock(time.monotonic())
        self.timeout_s = 5.0
        self.late: list[float] = []

    def note_real_done(self, op: object, t: float) -> None:
        self.late.append(t)


def test_work_completes_at_due_and_propagates_errors() -> None:
    from netsim.emulation._work import EmulatedWork, EmuOp, Timer

    emu = _FakeEmu()
    timer = Timer(emu)  # type: ignore[arg-type]
    emu.timer = timer  # type: ignore[attr-defined]
    try:
        op = EmuOp("allreduce", 8, 0.0)
        work = EmulatedWork(_FakeInner([torch.ones(2)]), op, emu)  # type: ignore[arg-type]
        fut = work.get_future()
        assert not work.is_completed()  # the due time is not even known yet
        due = emu.clock.now() + 0.05
        op.set_due(due)
        assert fut.wait()[0].tolist() == [1.0, 1.0]
        assert emu.clock.now() >= due - 1e-4  # not before the modeled time
        assert work.is_completed()
        # A failed real op fails the future and wait().
        op2 = EmuOp("allreduce", 8, 0.0)
        op2.set_due(0.0)
        bad = EmulatedWork(_FakeInner(error=RuntimeError("peer gone")), op2, emu)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="peer gone"):
            bad.get_future().wait()
        with pytest.raises(RuntimeError, match="peer gone"):
            bad.wait()
        # A failed resolution (e.g. the side group timed out) reaches the waiter too.
        op3 = EmuOp("send", 8, 0.0)
        op3.fail(TimeoutError("side group"))
        with pytest.raises(RuntimeError, match="side group"):
            EmulatedWork(_FakeInner(), op3, emu).wait()  # type: ignore[arg-type]
    finally:
        timer.close(5.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clock": "cpu"}, "clock"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"patch": 1}, "patch"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        emulate(LINK, **kwargs)


def test_link_or_topo_is_checked() -> None:
    with pytest.raises(ValueError, match="link_or_topo"):
        Emulator("40 Mbit/s")  # type: ignore[arg-type]


# ============================================================================ rank jobs
# Module-level functions: they run in the spawned ranks (pickled by reference).
#: Ranks start a timed operation together at a wall time agreed this far ahead.
ALIGN_AHEAD_S = 0.03


class _Aligner:
    """Starts the ranks' next call at one CLOCK_MONOTONIC instant (one host: a shared clock).

    The agreement travels on a plain gloo group that emulation does not touch. No emulated
    operation could do this: under the model a rank's completion depends on when its peers
    sent to it, so ranks that entered an operation apart also leave it apart."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")

    def __call__(self) -> None:
        t = torch.tensor([time.monotonic() + ALIGN_AHEAD_S], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        target = float(t.item())
        left = target - time.monotonic()
        if left > 1e-3:
            time.sleep(left - 1e-3)
        while time.monotonic() < target:  # the last millisecond: spin, sleep is too coarse
            pass

    def close(self) -> None:
        dist.destroy_process_group(self.group)


def _median_time(fn, sync) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(REPEATS):
        sync()
        t0 = time.monotonic()
        fn()
        samples.append(time.monotonic() - t0)
    return statistics.median(samples)


def _job_ops(rank: int, n: int, link: Link, nbytes: int, full: bool) -> tuple[dict[str, float], dict[str, float], dict]:
    """Ops timed from call to wait-return; returns (measured, model, stats).

    ``full`` adds the async variants, all_gather_into_tensor and point-to-point (n = 2); the
    n = 4 run keeps one of each kind of collective, so few timings share the 2 cores."""
    numel = nbytes // 4
    x = torch.ones(numel)
    meas: dict[str, float] = {}
    model: dict[str, float] = {}
    ser = link.serialization_time(nbytes)
    align = _Aligner()

    def timed(name: str, fn, expected: float | None) -> None:  # type: ignore[no-untyped-def]
        meas[name] = _median_time(fn, align)
        if expected is not None:
            model[name] = expected

    with emulate(link, seed=1) as emu:
        timed("all_reduce", lambda: dist.all_reduce(x), cost.allreduce_time(nbytes, link, n))
        outs = [torch.empty(numel) for _ in range(n)]
        timed("all_gather", lambda: dist.all_gather(outs, x), cost.allgather_time(nbytes, link, n))
        inputs = [torch.ones(numel // n) for _ in range(n)]
        out = torch.empty(numel // n)
        timed("reduce_scatter", lambda: dist.reduce_scatter(out, inputs), cost.reduce_scatter_time(nbytes, link, n))
        # Chain broadcast: the root is done when its copy is serialized, the last rank when
        # the payload has crossed every hop.
        bcast = ser if rank == 0 else cost.broadcast_time(nbytes, link, n) if rank == n - 1 else None
        timed("broadcast", lambda: dist.broadcast(x, src=0), bcast)
        timed("barrier", dist.barrier, math.ceil(math.log2(n)) * link.latency_s)
        # batch_isend_irecv: a ring exchange; each uplink and downlink carries one message.
        recv_buf = torch.empty(numel)

        def ring() -> None:
            ops = [dist.P2POp(dist.isend, x, (rank + 1) % n), dist.P2POp(dist.irecv, recv_buf, (rank - 1) % n)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()

        timed("batch_isend_irecv", ring, link.transfer_time(nbytes))
        if full:
            timed("all_reduce_async", lambda: dist.all_reduce(x, async_op=True).wait(), model["all_reduce"])
            big = torch.empty(numel * n)
            timed("all_gather_into_tensor", lambda: dist.all_gather_into_tensor(big, x, async_op=True).wait(),
                  model["all_gather"])
            # Point to point between ranks 0 and 1: isend completes when serialized, irecv on
            # arrival; the other ranks only take part in the alignment.
            if rank == 0:
                timed("send", lambda: dist.send(x, 1), ser)
                timed("isend", lambda: dist.isend(x, 1).wait(), ser)
            elif rank == 1:
                timed("send", lambda: dist.recv(x, 0), link.transfer_time(nbytes))
                timed("isend", lambda: dist.irecv(x, 0).wait(), link.transfer_time(nbytes))
            else:
                for _ in range(2 * REPEATS):
                    align()
        stats = emu.stats
    align.close()
    return meas, model, {"late_ops": stats.late_ops, "ops": stats.ops, "bytes_sent": stats.bytes_sent}


def _merge(samples: list[dict]) -> dict:
    """Per key: the median of numbers, all() of flags, the common value of anything else."""
    out: dict = {}
    for key in samples[0]:
        vals = [x[key] for x in samples]
        if all(isinstance(v, bool) for v in vals):
            out[key] = all(vals)
        elif all(isinstance(v, (int, float)) for v in vals):
            out[key] = statistics.median(vals)
        else:
            out[key] = vals[0] if all(v == vals[0] for v in vals) else vals
    return out


def _job_handles(rank: int, n: int, link: Link, nbytes: int) -> dict[str, object]:
    """is_completed / get_future / wait semantics on an async all-reduce, and recv(src=None)."""
    x = torch.ones(nbytes // 4)
    y = torch.zeros(nbytes // 4)
    align = _Aligner()

    def once() -> dict[str, object]:
        out: dict[str, object] = {}
        align()
        t0 = time.monotonic()
        w = dist.all_reduce(x.fill_(1.0), async_op=True)
        out["completed_at_issue"] = not w.is_completed()
        fut = w.get_future()
        value = fut.wait()
        out["future_s"] = time.monotonic() - t0
        out["value_ok"] = bool(torch.equal(value[0], torch.full_like(x, float(n))))
        out["completed_after_future"] = w.is_completed()
        w.wait()
        out["wait_after_s"] = time.monotonic() - t0
        # Polling alone also reaches completion, no earlier than the model.
        align()
        t0 = time.monotonic()
        w = dist.all_reduce(x, async_op=True)
        while not w.is_completed():
            time.sleep(POLL_INTERVAL_S)
        out["poll_s"] = time.monotonic() - t0
        # recv without a source: the sender is known only once the data is in.
        align()
        t0 = time.monotonic()
        if rank == 0:
            dist.send(torch.ones_like(y), 1)
        elif rank == 1:
            y.zero_()
            out["anysource_src"] = dist.recv(y)
            out["anysource_s"] = time.monotonic() - t0
            out["anysource_ok"] = bool(torch.equal(y, torch.ones_like(y)))
        return out

    with emulate(link) as emu:
        out = _merge([once() for _ in range(REPEATS)])
        out["late_ops"] = emu.stats.late_ops
    align.close()
    out["model"] = cost.allreduce_time(nbytes, link, n)
    return out


def _job_shared_bandwidth(rank: int, n: int, link: Link, nbytes: int) -> dict[str, float]:
    """Two concurrent messages 0 -> 1, then a p2p message concurrent with an all-reduce."""
    a, b = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
    align = _Aligner()

    def once() -> dict[str, float]:
        out: dict[str, float] = {}
        align()
        t0 = time.monotonic()
        if rank == 0:
            w1, w2 = dist.isend(a, 1), dist.isend(b, 1)
        else:
            w1, w2 = dist.irecv(a, 0), dist.irecv(b, 0)
        w1.wait()
        out["first"] = time.monotonic() - t0
        w2.wait()
        out["second"] = time.monotonic() - t0
        # An all-reduce and a p2p message issued together share rank 0's uplink.
        align()
        t0 = time.monotonic()
        wa = dist.all_reduce(a, async_op=True)
        wp = dist.isend(b, 1) if rank == 0 else dist.irecv(b, 0)
        wa.wait()
        wp.wait()
        out["mixed"] = time.monotonic() - t0
        return out

    with emulate(link) as emu:
        out = _merge([once() for _ in range(REPEATS)])
        stats = emu.stats
    align.close()
    out.update(sent=stats.bytes_sent, received=stats.bytes_received, uplink_busy=stats.uplink_busy_s, ops=stats.ops,
               late_ops=stats.late_ops)
    return out


def _job_patch_restore(rank: int, n: int, link: Link) -> dict[str, bool]:
    import torch.distributed._functional_collectives as funcol
    import torch.distributed.distributed_c10d as c10d

    import netsim.emulation._patch as patch_mod

    mods = (dist, c10d)
    fbefore = {k: getattr(funcol, k) for k in FUNCTIONAL_NAMES if hasattr(funcol, k)}
    align = _Aligner()
    before = {(m.__name__, k): getattr(m, k) for m in mods for k in PATCHED_NAMES if hasattr(m, k)}
    ranks_before = dict(c10d._world.pg_group_ranks)
    out: dict[str, bool] = {}
    with emulate(link) as emu:
        out["patched_inside"] = all(getattr(m, k) is not before[(m.__name__, k)] for m in mods for k in PATCHED_NAMES if hasattr(m, k))
        out["group_registered"] = emu.group in c10d._world.pg_group_ranks
        x = torch.ones(4)
        dist.all_reduce(x)
        # Functional collectives run unemulated and say so once.
        out["functional_wrapped"] = all(getattr(funcol, k) is not f for k, f in fbefore.items())
        y = funcol.all_reduce(torch.ones(4), "sum", dist.group.WORLD)
        out["functional_value_ok"] = bool(torch.equal(funcol.wait_tensor(y), torch.full((4,), float(n))))
        out["functional_warned"] = patch_mod._warned_functional
        try:
            with emulate(link):
                out["nested_refused"] = False
        except RuntimeError as exc:
            out["nested_refused"] = "do not nest" in str(exc)
    out["functional_restored"] = all(getattr(funcol, k) is f for k, f in fbefore.items())
    out["restored"] = all(getattr(m, k) is before[(m.__name__, k)] for m in mods for k in PATCHED_NAMES if hasattr(m, k))
    out["group_ranks_restored"] = dict(c10d._world.pg_group_ranks) == ranks_before
    # patch=False: nothing rebound, but emu.group still emulates.
    with emulate(link, patch=False) as emu:
        out["untouched"] = all(getattr(m, k) is before[(m.__name__, k)] for m in mods for k in PATCHED_NAMES if hasattr(m, k))
        x = torch.ones(50_000)
        out["group_call_s"] = _median_time(lambda: dist.all_reduce(x.fill_(1.0), group=emu.group), align)  # type: ignore[assignment]
        out["value_ok"] = bool(torch.equal(x, torch.full_like(x, float(n))))
        out["late_ops"] = emu.stats.late_ops  # type: ignore[assignment]
    # A failure inside the block still restores.
    try:
        with emulate(link):
            raise KeyError("boom")
    except KeyError:
        pass
    out["restored_after_error"] = all(getattr(m, k) is before[(m.__name__, k)] for m in mods for k in PATCHED_NAMES if hasattr(m, k))
    try:
        with emulate(Topo(n + 1, link)):
            pass
    except ValueError as exc:
        out["topo_n_checked"] = "topo.n" in str(exc)
    align.close()
    return out


def _job_virtual(rank: int, n: int, link: Link, nbytes: int, seed: int) -> dict[str, object]:
    """clock='virtual': no sleeping; identical due times for identical inputs."""
    x = torch.ones(nbytes // 4)
    t_wall = time.monotonic()
    times = []
    with emulate(link, seed=seed, clock="virtual") as emu:
        for k in range(3):
            emu.compute(0.05 * (rank + 1))  # rank 1 computes longer: a straggler
            dist.all_reduce(x)
            times.append(emu.now())
            if rank == 0:
                dist.send(x, 1)
            elif rank == 1:
                dist.recv(x, 0)
            times.append(emu.now())
        # A future moves the virtual clock to the due time when it completes.
        before = emu.now()
        dist.all_reduce(x, async_op=True).get_future().wait()
        times.append(emu.now())
        future_advanced = times[-1] > before
    return {"times": times, "wall_s": time.monotonic() - t_wall, "future_advanced": future_advanced}


def _job_ddp(rank: int, n: int, link: Link, mode: str) -> dict[str, object]:
    """One DDP step through emu.group, emu.allreduce_hook or a Python hook via the patch."""
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 10))
    data = torch.randn(8, 200, generator=torch.Generator().manual_seed(rank))
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    out: dict[str, object] = {"model": cost.allreduce_time(nbytes, link, n)}
    ref = [p.detach().clone() for p in model.parameters()]
    align = _Aligner()
    with emulate(link) as emu:
        if mode == "group":
            ddp = DDP(model, process_group=emu.group, bucket_cap_mb=25)
        else:
            ddp = DDP(model, bucket_cap_mb=25)
            if mode == "hook":
                ddp.register_comm_hook(None, emu.allreduce_hook)
            else:
                # Unannotated on purpose: DDP rejects this module's string annotations.
                def py_hook(state, bucket):  # type: ignore[no-untyped-def]
                    t = bucket.buffer().div_(n)
                    return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

                ddp.register_comm_hook(None, py_hook)
        samples = []
        for _ in range(REPEATS):
            model.zero_grad()
            loss = ddp(data).pow(2).sum()
            align()
            t0 = time.monotonic()
            loss.backward()
            samples.append(time.monotonic() - t0)
        out["backward_s"] = statistics.median(samples)
        out["late_ops"] = emu.stats.late_ops
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    # The reference: the same mean gradient by a plain all-reduce, outside emulation.
    ref_model = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 10))
    with torch.no_grad():
        for p, r in zip(ref_model.parameters(), ref):
            p.copy_(r)
    ref_model(data).pow(2).sum().backward()
    ref_grads = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    dist.all_reduce(ref_grads)
    out["grads_ok"] = bool(torch.allclose(grads, ref_grads / n, rtol=1e-5, atol=1e-6))
    align.close()
    return out


def _job_clock_offset(rank: int, n: int, link: Link) -> dict[str, float]:
    """Pretend the ranks boot differently, forcing the ping-pong offset estimate (one host,
    so the true offset is 0), and check that timing still holds."""
    import netsim.emulation._sync as sync_mod

    real = sync_mod.boot_id
    sync_mod.boot_id = lambda: f"fake-boot-{rank}"
    try:
        align = _Aligner()
        with emulate(link) as emu:
            t0s = [0.0] * n
            dist.all_gather_object(t0s, emu.clock.t0, group=align.group)
            x = torch.ones(NBYTES // 4)
            elapsed = _median_time(lambda: dist.all_reduce(x), align)
            late = emu.stats.late_ops
        align.close()
    finally:
        sync_mod.boot_id = real
    return {"t0_spread_s": max(t0s) - min(t0s), "all_reduce_s": elapsed, "late_ops": late}


def _job_trace(rank: int, n: int, link: Link, nbytes: int, at_s: float) -> dict[str, Any]:
    """One message over a time-varying link, sent at emulation time ``at_s`` (REPEATS entries,
    each with its own t0); "runs": (sender's start, this rank's end) per run."""
    x = torch.ones(nbytes // 4)
    align = _Aligner()
    runs, late = [], 0
    for _ in range(REPEATS):
        with emulate(link) as emu:
            emu.clock.sleep_until(at_s)
            start = emu.now()
            if rank == 0:
                dist.send(x, 1)
            else:
                dist.recv(x, 0)
            end = emu.now()
            starts = [0.0] * n
            dist.all_gather_object(starts, start, group=align.group)
            late += emu.stats.late_ops
        runs.append((starts[0], end))
    align.close()
    return {"runs": runs, "late_ops": late}


def _job_subgroup(rank: int, n: int, link: Link) -> dict[str, object]:
    """Emulate only the subgroup {0, 1}: its calls are shaped, the default group's are not."""
    sub = dist.new_group([0, 1], backend="gloo")
    align = _Aligner()
    out: dict[str, object] = {}
    x = torch.ones(NBYTES // 4)
    if rank in (0, 1):
        with emulate(link, group=sub) as emu:
            out["sub_s"] = _median_time(lambda: dist.all_reduce(x, group=sub), align)
            out["group_rank"] = emu.rank
            out["late_ops"] = emu.stats.late_ops
    else:
        for _ in range(REPEATS):
            align()
    # The default group stays unemulated (it was never patched for it).
    align()
    t0 = time.monotonic()
    dist.all_reduce(torch.ones(4))
    out["world_s"] = time.monotonic() - t0
    align.close()
    dist.destroy_process_group(sub)
    return out


def _job_ccomm(rank: int, n: int, link: Link) -> dict[str, float]:
    """ccomm's transport calls torch.distributed through the module, so the patch shapes it."""
    from ccomm import make_codec
    from ccomm.comm import allreduce_payload

    codec = make_codec("fp16")
    x = torch.ones(NBYTES // 4)  # float32: the fp16 payload is half of it
    align = _Aligner()
    with emulate(link) as emu:
        payload = codec.encode(x)
        # The ring without and with the wire-header check: the check is one more gather
        # of HEADER_BYTES per rank ahead of the data (ccomm.comm.header_exchange.exchange_headers).
        bare = _median_time(lambda: allreduce_payload(payload, algo="ring", check=False), align)
        checked = _median_time(lambda: allreduce_payload(payload, algo="ring", check=True), align)
        late = emu.stats.late_ops
    align.close()
    return {"s": bare, "checked_s": checked, "nbytes": float(payload.nbytes), "late_ops": late}


def _job_late(rank: int, n: int) -> dict[str, float]:
    """A link faster than loopback: the real transport is late, and stats say so."""
    fast = Link(100_000, 0)
    x = torch.ones(4_000_000)  # 16 MB: ~1.3 ms modeled, far longer on loopback gloo
    with emulate(fast) as emu:
        dist.all_reduce(x)
        return {"late_ops": emu.stats.late_ops, "max_late_s": emu.stats.max_late_s}


def _job_fan_in(rank: int, n: int, link: Link, nbytes: int, shared: bool) -> dict[str, float]:
    """Ranks 1..n-1 send to rank 0 at once: shared, they queue on rank 0's downlink."""
    x = torch.ones(nbytes // 4)
    samples = []
    align = _Aligner()
    with emulate(Topo(n, link, shared=shared)) as emu:
        for _ in range(REPEATS):
            align()
            t0 = time.monotonic()
            if rank == 0:
                bufs = [torch.empty_like(x) for _ in range(1, n)]
                works = [dist.irecv(b, src) for src, b in zip(range(1, n), bufs)]
            else:
                works = [dist.isend(x, 0)]
            for w in works:
                w.wait()
            samples.append(time.monotonic() - t0)
        stats = emu.stats
    align.close()
    return {"s": statistics.median(samples), "late_ops": float(stats.late_ops), "max_late_s": stats.max_late_s}


# ============================================================================ multiprocess
@pytest.fixture(scope="module")
def ranks2():  # type: ignore[no-untyped-def]
    group = LazyRanks(2)
    yield group
    group.close()


@pytest.fixture(scope="module")
def ranks4():  # type: ignore[no-untyped-def]
    group = LazyRanks(4)
    yield group
    group.close()


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n2_every_op_matches_model(ranks2: LazyRanks) -> None:
    results = _timed(ranks2, _job_ops, LINK, NBYTES, True, timeout_s=90)
    _report(f"n=2, {LINK}, {NBYTES} B, median of {REPEATS}", results)
    for rank, (meas, model, stats) in enumerate(results):
        _check(meas, model, rank, stats)
        assert stats["bytes_sent"] > 0


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n4_every_op_matches_model(ranks4: LazyRanks) -> None:
    link = Link(40, 10)
    results = _timed(ranks4, _job_ops, link, 100_000, False, timeout_s=120)
    _report(f"n=4, {link}, 100000 B, median of {REPEATS}", results)
    for rank, (meas, model, stats) in enumerate(results):
        _check(meas, model, rank, stats)


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n2_work_handles(ranks2: LazyRanks) -> None:
    for rank, out in enumerate(_timed(ranks2, _job_handles, LINK, NBYTES)):
        model = out["model"]
        assert out["completed_at_issue"] is True  # i.e. not completed when issued
        assert out["value_ok"]
        assert out["completed_after_future"] is True
        assert abs(out["future_s"] - model) <= _tol(model), f"rank {rank} future: {out['future_s']} vs {model}"
        # A poll loop sees completion up to one polling interval late.
        assert abs(out["poll_s"] - model) <= _tol(model) + POLL_INTERVAL_S, f"rank {rank} poll: {out['poll_s']} vs {model}"
        assert out["wait_after_s"] >= out["future_s"]
        if rank == 1:
            want = LINK.transfer_time(NBYTES)
            assert out["anysource_src"] == 0 and out["anysource_ok"]
            assert abs(out["anysource_s"] - want) <= _tol(want), (out["anysource_s"], want)


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n2_concurrent_messages_share_bandwidth(ranks2: LazyRanks) -> None:
    link, nbytes = LINK, NBYTES
    ser = link.serialization_time(nbytes)
    got = _timed(ranks2, _job_shared_bandwidth, link, nbytes)
    s0, s1 = got
    # Sender: the second message is serialized after the first.
    assert abs(s0["first"] - ser) <= _tol(ser)
    assert abs(s0["second"] - 2 * ser) <= _tol(2 * ser)
    # Receiver: arrivals one latency later.
    assert abs(s1["first"] - (ser + link.latency_s)) <= _tol(ser + link.latency_s)
    assert abs(s1["second"] - (2 * ser + link.latency_s)) <= _tol(2 * ser + link.latency_s)
    # An all-reduce (two ring steps of S/2) and then a p2p message of S, issued together.
    # The replay books both ring steps on rank 0's uplink (step 2 after step 1's arrival,
    # ending at S/B + L); the gap while step 1 travels is not lost: the uplink is free for the
    # p2p message once the all-reduce's S/B of bytes are through (gloo's concurrent
    # operations fill such gaps on a real link). Sender: done at 2S/B; receiver: + L.
    want0, want1 = 2 * ser, 2 * ser + link.latency_s
    assert abs(s0["mixed"] - want0) <= _tol(want0), (s0, want0)
    assert abs(s1["mixed"] - want1) <= _tol(want1), (s1, want1)
    # emu.stats: per run rank 0 sends two messages, its ring half of the all-reduce (two
    # chunks of S/2) and one more message: 4S bytes and 4 S/B of uplink time; rank 1 sends S.
    runs = REPEATS
    assert s0["sent"] == pytest.approx(runs * 4 * nbytes) and s1["received"] == pytest.approx(runs * 4 * nbytes)
    assert s1["sent"] == pytest.approx(runs * nbytes) and s0["received"] == pytest.approx(runs * nbytes)
    assert s0["uplink_busy"] == pytest.approx(runs * 4 * ser)
    assert s0["ops"] == s1["ops"] == runs * 4


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n4_fan_in_shared_vs_mesh(ranks4: LazyRanks) -> None:
    link, nbytes = Link(40, 10), 100_000
    ser = link.serialization_time(nbytes)
    shared = _timed(ranks4, _job_fan_in, link, nbytes, True)
    mesh = _timed(ranks4, _job_fan_in, link, nbytes, False)
    # Shared: rank 0's downlink takes the three messages one after the other.
    want = 3 * ser + link.latency_s
    assert abs(shared[0]["s"] - want) <= _tol(want), (shared[0], want)
    # Mesh: every pair is its own link, so all three arrive together.
    want = ser + link.latency_s
    assert abs(mesh[0]["s"] - want) <= _tol(want), (mesh[0], want)


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n2_patch_restores_exactly(ranks2: LazyRanks) -> None:
    for out in _timed(ranks2, _job_patch_restore, LINK):
        flags = {k: v for k, v in out.items() if k not in ("group_call_s", "late_ops")}
        assert all(flags.values()), flags
        model = cost.allreduce_time(200_000, LINK, 2)
        assert abs(out["group_call_s"] - model) <= _tol(model)


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n2_virtual_clock_is_deterministic_and_never_sleeps(ranks2: LazyRanks) -> None:
    link = Link(2, 50, jitter_ms=20)  # 2 Mbit/s: each all-reduce is ~0.4 s of model time
    nbytes = 100_000
    # Only the wall-time bound below is timing; it has 0.6 s of room, so lags of tens of ms are harmless.
    a = _timed(ranks2, _job_virtual, link, nbytes, 7, lag_limit_s=0.05)
    b = ranks2.run(_job_virtual, link, nbytes, 7)
    c = ranks2.run(_job_virtual, link, nbytes, 8)
    assert [r["times"] for r in a] == [r["times"] for r in b]
    assert all(r["future_advanced"] for r in a)
    assert [r["times"] for r in a] != [r["times"] for r in c]  # the seed moves the jitter
    final = a[0]["times"][-1]
    assert all(r["wall_s"] < 0.5 * final for r in a), (a, final)
    # Rank 1 computes 0.1 s, rank 0 0.05 s. The ring's second step on rank 1 waits for rank
    # 0's copy of rank 1's first message, so rank 1 ends two jittered hops (S/2 + L +- J
    # each) after its own entry; rank 0 cannot end before rank 1's first chunk reached it.
    ser = link.serialization_time(nbytes / 2)
    lo = 0.1 + 2 * (ser + link.latency_s - link.jitter_s)
    hi = 0.1 + 2 * (ser + link.latency_s + link.jitter_s)
    assert lo <= a[1]["times"][0] <= hi, (a[1]["times"][0], lo, hi)
    assert a[0]["times"][0] >= 0.1 + ser + link.latency_s - link.jitter_s


@pytest.mark.multiprocess
@pytest.mark.timing
@pytest.mark.parametrize("mode", ["group", "hook", "python_hook"])
def test_n2_ddp(ranks2: LazyRanks, mode: str) -> None:
    link = Link(20, 10)
    for rank, out in enumerate(_timed(ranks2, _job_ddp, link, mode)):
        assert out["grads_ok"], f"rank {rank}: DDP gradients differ from the mean all-reduce"
        model = out["model"]
        # Backward ends after the modeled all-reduce of the gradients (plus a little compute).
        assert out["backward_s"] >= model - _tol(model), (rank, out)
        assert out["backward_s"] <= model + _tol(model) + DDP_COMPUTE_S, (rank, out)


@pytest.mark.multiprocess
def test_n2_late_ops_are_counted(ranks2: LazyRanks) -> None:
    for out in ranks2.run(_job_late):
        assert out["late_ops"] >= 1 and out["max_late_s"] > LATE_SLACK_S


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n2_clock_offsets_across_hosts(ranks2: LazyRanks) -> None:
    model = cost.allreduce_time(NBYTES, LINK, 2)
    for out in _timed(ranks2, _job_clock_offset, LINK):
        # One host: the estimated offset is within a loopback round trip of zero.
        assert out["t0_spread_s"] < CLOCK_SYNC_TOL_S, out
        # ...but not exactly zero: the estimate really ran (a shared clock gives identical t0s).
        assert out["t0_spread_s"] > 0.0, out
        assert abs(out["all_reduce_s"] - model) <= _tol(model), out


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n2_trace_outage_pauses_transfer(ranks2: LazyRanks) -> None:
    # 20 Mbit/s, an outage from 0.3 s to 0.5 s, then 20 Mbit/s again. 250 kB sent at 0.25 s
    # is half out when the outage starts, waits it out, and finishes at ~0.55 s.
    link = Link(None, 10, trace=Trace.steps([(0, 20), (0.3, 0), (0.5, 20)]))
    nbytes = 250_000
    sender, receiver = (r["runs"] for r in _timed(ranks2, _job_trace, link, nbytes, 0.25))
    fin_err, arr_err = [], []
    for (s, end0), (_, end1) in zip(sender, receiver):
        want_fin = s + link.serialization_time(nbytes, s)
        assert want_fin > 0.5  # the case under test: the transfer really spans the outage
        fin_err.append(end0 - want_fin)
        arr_err.append(end1 - (s + link.transfer_time(nbytes, s)))
    span = link.transfer_time(nbytes, 0.25)  # the modeled duration the tolerance applies to
    assert abs(statistics.median(fin_err)) <= _tol(span), fin_err
    assert abs(statistics.median(arr_err)) <= _tol(span), arr_err


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n4_subgroup(ranks4: LazyRanks) -> None:
    model = cost.allreduce_time(NBYTES, LINK, 2)

    # Torch names subgroups with local synchronization by their ranks and the live group
    # count, so a second emulation of {0, 1} on the same ranks would reuse the first's store
    # keys and hang: every attempt gets ranks that have run nothing yet.
    out = on_time(lambda: ranks4.run(_job_subgroup, LINK), _late, setup=ranks4.fresh)
    for rank in (0, 1):
        assert out[rank]["group_rank"] == rank
        assert abs(out[rank]["sub_s"] - model) <= _tol(model), (rank, out[rank], model)
    assert all(r["world_s"] < 0.5 * model for r in out), out


@pytest.mark.multiprocess
@pytest.mark.timing
def test_n2_ccomm_transport_is_shaped(ranks2: LazyRanks) -> None:
    for out in _timed(ranks2, _job_ccomm, LINK):
        assert out["nbytes"] == NBYTES // 2
        model = cost.allreduce_time(out["nbytes"], LINK, 2)
        assert abs(out["s"] - model) <= _tol(model), (out, model)
        checked = model + cost.allgather_time(HEADER_BYTES, LINK, 2)
        assert abs(out["checked_s"] - checked) <= _tol(checked), (out, checked)
