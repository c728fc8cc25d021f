"""Keep gloo's worker threads from freeing Python-visible tensors while the interpreter finalizes.

The failure this prevents ("terminate called without an active exception", exit -6, after
correct results): a gloo worker thread (`ProcessGroupGloo::runLoop`, named
``pt_gloo_runloop``) completes a Work, which wakes the thread waiting on it, and only then
drops its own reference to the Work. If that was the last reference, the Work's destructor
frees its tensors; a tensor Python has seen releases its PyObject when its C++ refcount
falls from 2 to 1 (`c10::intrusive_ptr`'s PyObject preservation), and that takes the GIL,
whoever else still references the tensor. A worker that asks for the GIL once
`Py_FinalizeEx` has begun is ended by Python with `pthread_exit`, whose unwinding through
torch's noexcept destructor calls `std::terminate`.

Nothing in Python can see the Work's refcount, and the worker threads of the default group
are never joined in a DDP program (DDP keeps the group's backend alive to the end, so
`destroy_process_group()` leaves its threads running), so the last drop cannot be moved to
the main thread in general. What can be done is to let the workers finish it before
finalization: `wait_gloo_workers_parked` waits, with the GIL released, until every gloo
worker thread of this process is parked on its queue (`_parked`: asleep in a futex wait
without a timeout, read from ``/proc/self/task/<tid>/syscall``). A worker that still holds
a completed Work is runnable (it was preempted by the thread its completion woke, which is
the race: on a loaded host that thread reaches the end of the program first) or waits for
the GIL (a futex wait with a timeout), which it gets while this sleeps; a parked worker
touches nothing. `atexit`
callbacks run before Python starts finalizing (threads may still take the GIL then), so
`install_exit_guard` (idempotent; `deco_sgd.DecoState` and `stop_at_exit` call it) covers
every Work of every group, the library's and the application's own last collectives alike.

A second path ends the same way on ccomm's own helper threads (`ccomm.comm.p2p`'s collective
thread, `CommHandle`'s waiter thread, `ccomm.failfast`'s watcher): they complete the
futures the main thread waits on with `torch.futures.Future.set_result` (or
`set_exception`), and the watcher reads the store; each releases the GIL in C++ and takes
it back in a destructor (noexcept; `set_result` wakes the waiter first). A main thread that
reaches finalization meanwhile aborts the process the same way. These calls run inside
`completing()`, which counts them; the guard also waits until that count is zero. The count
rises before the call and falls only after it returned (the GIL retaken), so this part is
exact for calls begun before the guard ran.

A third path is a helper thread that wakes by itself and runs Python after the guard has
returned: `ccomm.failfast`'s watcher prunes its list of watched futures every `POLL_S`, and
the entries it drops hold the last references to finished `CommHandle`s, their futures and
result tensors (the main thread has dropped its own). Freeing a tensor releases the GIL
(`THPVariable_clear`) and retakes it in a noexcept frame: a main thread that reaches
`Py_FinalizeEx` meanwhile aborts the process, rank 0's watcher in a core caught after
correct results (frames: `THPVariable_clear` <- `THPVariable_dealloc` <- ... <-
`list_dealloc` <- the prune ``self.entries = [...]``, now in `_Watcher._poll`). Counting
such work cannot help, since it may begin after the count was read, so such a thread
registers a stopper with `stop_at_exit`: the guard calls it first, and it stops the thread
and joins it. A joined thread is gone, its last frame freed with the GIL held, so this part
is exact.

Limits [ours]: Linux only (``/proc/self/task``; elsewhere only `completing` blocks are
waited for). A worker blocked on a collective still in flight (a timed wait that lasts
longer than `LONG_WAIT_S`) is let be: waiting cannot help it, and an exit with a transfer
in flight is unsafe anyway. A parked worker is woken by nothing but new work or its
group's destruction, neither of which touches Python tensors.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import platform
import threading
import time
from typing import Callable, Iterator

__all__ = ["wait_gloo_workers_parked", "install_exit_guard", "stop_at_exit", "completing", "EXIT_WAIT_S", "PARKED_SAMPLES", "LONG_WAIT_S"]

#: The longest the exit guard waits for gloo's workers (a hung worker must not hang the exit).
EXIT_WAIT_S = 5.0
#: Consecutive samples, `_SAMPLE_S` apart, in which every worker must be parked (more than
#: one: a sample is not atomic across threads).
PARKED_SAMPLES = 3
_SAMPLE_S = 1e-3
#: A timed wait longer than this (ten default switch intervals) is not a wait for the GIL.
LONG_WAIT_S = 0.05
_WORKER_NAME = "pt_gloo_runloop"
_TASKS = "/proc/self/task"
#: The futex syscall's number per machine (None: unknown here, the thread state alone is checked).
_FUTEX_NR: int | None = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine())

_installed = False
#: Helper-thread future completions in progress (`completing`).
_completing = 0
_completing_lock = threading.Lock()
#: Helper-thread stoppers (`stop_at_exit`), called with the seconds left before the deadline.
_stoppers: list[Callable[[float], bool]] = []


@contextlib.contextmanager
def completing() -> Iterator[None]:
    """Wrap a helper thread's `Future.set_result` / `set_exception`: the exit guard waits
    until every such block has returned (see the module docstring)."""
    global _completing
    with _completing_lock:
        _completing += 1
    try:
        yield
    finally:
        with _completing_lock:
            _completing -= 1


def _worker_state(tid: str) -> str | None:
    """"parked", "timed" or "busy" for gloo worker `tid` (None: not a gloo worker, or gone).

    Parked means asleep in a futex wait without a timeout: a condition-variable wait on the
    worker's queue. A worker waiting for the GIL also sleeps in a futex wait, but CPython's
    GIL wait has a timeout (it asks the holder to switch every `sys.getswitchinterval()`),
    so the syscall's arguments tell the two apart ("timed"); so does a worker blocked on a
    transfer in flight (gloo waits with the group's timeout). A worker that is runnable or
    between syscalls is busy. Where the syscall cannot be read, "asleep" is all that is
    checked.
    """
    try:
        with open(f"{_TASKS}/{tid}/stat") as f:
            stat = f.read()
    except OSError:  # the thread ended meanwhile
        return None
    head, _, tail = stat.rpartition(")")
    fields = tail.split()
    if not head.endswith(_WORKER_NAME) or not fields:
        return None
    if fields[0] != "S":
        return "busy"
    if _FUTEX_NR is None:
        return "parked"
    try:
        with open(f"{_TASKS}/{tid}/syscall") as f:
            call = f.read().split()
    except OSError:  # unreadable here (ptrace restrictions): the state has to do
        return "parked"
    # "<nr> <uaddr> <op> <val> <timeout> ...": an untimed wait has timeout 0x0.
    if len(call) > 4 and call[0] == str(_FUTEX_NR):
        return "parked" if int(call[4], 16) == 0 else "timed"
    return "busy"


def _runnable_workers(timed_since: dict[str, float] | None = None) -> int | None:
    """How many gloo worker threads may still need the GIL; None without /proc.

    A worker in a timed wait counts until it has stayed there `LONG_WAIT_S` (tracked in
    `timed_since`, tid -> first seen): a GIL waiter gets the GIL within one switch interval
    of asking while this thread sleeps, so a longer wait is a transfer in flight, which
    waiting for cannot help.
    """
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return None
    now = time.monotonic()
    since = {} if timed_since is None else timed_since
    busy = 0
    for tid in tids:
        state = _worker_state(tid)
        if state == "timed":
            first = since.setdefault(tid, now)
            busy += now - first < LONG_WAIT_S
        else:
            since.pop(tid, None)
            busy += state == "busy"
    return busy


def wait_gloo_workers_parked(timeout_s: float = EXIT_WAIT_S) -> bool:
    """Block (sleeping, so the GIL is free) until no gloo worker thread of this process may
    still need the GIL (`_runnable_workers`), and no `completing()` block is open, for
    `PARKED_SAMPLES` samples in a row; False if `timeout_s` ran out first. Without /proc
    only the blocks count."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    timed_since: dict[str, float] = {}
    while True:
        busy = _runnable_workers(timed_since)
        if busy is None and _completing == 0:
            return True
        quiet = quiet + 1 if not busy and _completing == 0 else 0
        if quiet >= PARKED_SAMPLES:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_SAMPLE_S)


def stop_at_exit(stop: Callable[[float], bool]) -> None:
    """Have the exit guard call ``stop(timeout_s)`` before it waits for the workers (and
    install the guard). ``stop`` must end a helper thread that may run Python on its own
    and join it within ``timeout_s``, returning whether it ended (see the module docstring)."""
    _stoppers.append(stop)
    install_exit_guard()


def _stop_helpers(deadline: float) -> None:
    # Stopped first: a stopping helper may still drop references, which the workers' wait
    # does not see. All share the one EXIT_WAIT_S bound, so a hung helper cannot hang the exit.
    for stop in list(_stoppers):
        stop(max(0.0, deadline - time.monotonic()))


def _at_exit() -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    _stop_helpers(deadline)
    wait_gloo_workers_parked(max(0.0, deadline - time.monotonic()))


def install_exit_guard() -> None:
    """At interpreter exit, before finalization, stop the `stop_at_exit` helpers and run
    `wait_gloo_workers_parked` (idempotent)."""
    global _installed
    if not _installed:
        atexit.register(_at_exit)
        _installed = True
