"""ccomm.exitguard: at exit, wait until no gloo worker thread is runnable (so none frees a
tensor, which takes the GIL, while Python finalizes)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ccomm import exitguard

ROOT = Path(__file__).resolve().parents[2]


def test_waits_for_consecutive_parked_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker runnable in between restarts the count: only PARKED_SAMPLES quiet ones in a row end the wait.
    seq = iter([0, 1, 0, 0, 2] + [0] * exitguard.PARKED_SAMPLES)
    seen: list[int] = []

    def fake(_since: object = None) -> int:
        seen.append(1)
        return next(seq)

    monkeypatch.setattr(exitguard, "_runnable_workers", fake)
    assert exitguard.wait_gloo_workers_parked(timeout_s=10.0)
    assert len(seen) == 5 + exitguard.PARKED_SAMPLES


def test_gives_up_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exitguard, "_runnable_workers", lambda _s=None: 1)
    assert not exitguard.wait_gloo_workers_parked(timeout_s=0.02)


def test_without_proc_it_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exitguard, "_TASKS", "/nonexistent/task")
    assert exitguard.wait_gloo_workers_parked(timeout_s=0.0)


def test_install_registers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(exitguard, "_installed", False)
    monkeypatch.setattr(exitguard.atexit, "register", lambda fn: calls.append(fn))
    exitguard.install_exit_guard()
    exitguard.install_exit_guard()
    assert calls == [exitguard._at_exit]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_sees_idle_gloo_workers_as_parked() -> None:
    # A one-rank gloo group after a collective: its two pt_gloo_runloop threads are found
    # (by name) and are parked, so the wait ends within a few samples.
    code = textwrap.dedent("""
        import os, time, torch, torch.distributed as dist
        from ccomm import exitguard
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        dist.all_reduce(torch.ones(4))
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        assert names.count("pt_gloo_runloop") >= 1, names
        t0 = time.monotonic()
        assert exitguard.wait_gloo_workers_parked(timeout_s=10.0)
        print("waited", time.monotonic() - t0)
        dist.destroy_process_group()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split("waited")[1]) < 5.0


def test_waits_for_open_completing_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # A helper thread's set_result may still be retaking the GIL: the guard waits for the block to close.
    import threading
    import time

    monkeypatch.setattr(exitguard, "_runnable_workers", lambda _s=None: 0)
    inside, release = threading.Event(), threading.Event()

    def helper() -> None:
        with exitguard.completing():
            inside.set()
            release.wait(10.0)

    t = threading.Thread(target=helper)
    t.start()
    inside.wait(10.0)
    assert not exitguard.wait_gloo_workers_parked(timeout_s=0.05)
    threading.Timer(0.05, release.set).start()
    t0 = time.monotonic()
    assert exitguard.wait_gloo_workers_parked(timeout_s=10.0)
    assert time.monotonic() - t0 >= 0.04
    t.join()


def test_a_long_timed_wait_is_let_be(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker in a timed wait counts (it may be waiting for the GIL) until it has stayed
    # there LONG_WAIT_S: then it is blocked on a transfer, and the guard stops waiting for it.
    import time

    monkeypatch.setattr(exitguard.os, "listdir", lambda _p: ["7"])
    monkeypatch.setattr(exitguard, "_worker_state", lambda _t: "timed")
    t0 = time.monotonic()
    assert exitguard.wait_gloo_workers_parked(timeout_s=10.0)
    assert exitguard.LONG_WAIT_S <= time.monotonic() - t0 < 5.0
    monkeypatch.setattr(exitguard, "_worker_state", lambda _t: "busy")
    assert not exitguard.wait_gloo_workers_parked(timeout_s=0.1)


def test_the_guard_joins_the_failfast_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    # The watcher dropped the last references to finished handles (their result tensors)
    # after the guard had returned; freeing a tensor retakes the GIL, which aborted the
    # process once finalization had begun. The guard must leave no such thread running, and
    # the watcher's entries must stay for the main thread to free.
    import threading

    from ccomm import failfast

    monkeypatch.setattr(exitguard, "_installed", True)  # no atexit registration in the test process
    monkeypatch.setattr(exitguard, "_stoppers", [])
    monkeypatch.setattr(exitguard, "wait_gloo_workers_parked", lambda _t=exitguard.EXIT_WAIT_S: True)
    before = set(threading.enumerate())
    watcher = failfast._Watcher()
    started = [t for t in threading.enumerate() if t not in before and t.name == "ccomm-failfast-watch"]
    assert len(started) == 1
    held = object()
    watcher.entries.append((0.0, lambda: False, lambda _e, h=held: None, "pending"))
    exitguard._at_exit()
    assert not started[0].is_alive()
    assert [e[3] for e in watcher.entries] == ["pending"]
    monkeypatch.setattr(failfast, "_watcher", watcher)
    monkeypatch.setattr(failfast, "_store", lambda: object())
    failfast.watch(lambda: False, lambda _e: None, "late")  # after the stop: not watched
    assert [e[3] for e in watcher.entries] == ["pending"]


class _Result:
    """Stands for a result tensor: weakly referenceable, so the test sees when it is freed."""


@pytest.mark.parametrize("fails", [False, True])
def test_helper_threads_drop_their_last_references_inside_the_counted_block(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    # Freeing a result tensor retakes the GIL, which aborts the process once finalization has
    # begun: a "ccomm-wait" thread and a group's collective thread must drop the handle, the
    # future and the result while completing() is open, which the exit guard waits for; the
    # Thread object itself keeps only an emptied list.
    import contextlib
    import threading
    import weakref

    import torch

    from ccomm.comm import _handle, p2p

    freed_inside: list[bool] = []
    refs: dict[str, weakref.ref] = {}

    @contextlib.contextmanager
    def counted():  # type: ignore[no-untyped-def]
        yield
        freed_inside.append(refs["result"]() is None)

    monkeypatch.setattr(_handle, "completing", counted)
    monkeypatch.setattr(p2p, "completing", counted)

    class Handle:
        def wait(self) -> _Result:
            r = _Result()
            refs["result"] = weakref.ref(r)
            if fails:
                raise RuntimeError("peer gone", r)  # the error holds the result too
            return r

    fut: torch.futures.Future = torch.futures.Future()
    fut.add_done_callback(lambda f: None)
    args = [Handle(), fut]
    t = threading.Thread(target=_handle._wait_then_complete, args=(args,), name="ccomm-wait", daemon=True)
    del fut
    t.start()
    t.join(10.0)
    assert args == [] and not t.is_alive()
    # The future is gone too (nobody else held it), so the result was freed inside the block.
    assert freed_inside == [True]

    # A group's collective thread: once the job is done and the thread waits for the next
    # one, its frame holds none of the job's references (the closure, the work, the result
    # or the error); they were dropped inside the block.
    import sys

    freed_inside.clear()
    runner = p2p._Runner()
    w = runner.submit(lambda: Handle().wait())
    try:
        w.get_future().wait()
        raised = False
    except RuntimeError:
        raised = True
    assert raised == fails
    deadline = time.monotonic() + 10.0  # the caller wakes before the block is left
    while not freed_inside and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(freed_inside) == 1
    frame = sys._current_frames()[runner._thread.ident]
    while frame is not None and frame.f_code.co_name != "_run":
        frame = frame.f_back
    assert frame is not None
    assert not {"value", "error", "fn", "work"} & set(frame.f_locals), sorted(frame.f_locals)
