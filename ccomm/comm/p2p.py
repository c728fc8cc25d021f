"""Point-to-point machinery of the log-depth collectives (`loggather`, `logreduce`).

1. Every collective runs as one job on a thread of its own per process group, jobs in
   call order. A round waits on the previous one, so an asynchronous call needs a thread;
   one thread per group keeps each group's collectives in program order, which every rank
   shares, so messages of two collectives on one pair of ranks never interleave.
2. `post` hands a list of sends and receives to ``dist.batch_isend_irecv`` (gloo and NCCL
   alike; under ``netsim.emulate`` the patched function times them), all in flight before
   any is waited on, tagged with `TAG` so they never match `send_recv` traffic (tag 0).
3. `ThreadWork` is the job's Work-like handle for `CommHandle`: ``wait`` re-raises the
   job's error, ``get_future`` is the future the job completes.

`set_send_hook` is a test-only seam: the hook sees every message a log-depth collective
sends as ``(step, src, dst, nbytes)`` in group ranks, which tests compare with
`ccomm.schedule` (never by parsing logs).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..exitguard import completing
from ._handle import wrap_error

__all__ = ["TAG", "SendHook", "ThreadWork", "post", "set_send_hook", "submit", "wait_all"]


#: Tag of every log-depth message (gloo matches point-to-point messages by peer and tag).
TAG = 0x6363
#: ``hook(step, src, dst, nbytes)``, called on the sending rank for every message.
SendHook = Callable[[int, int, int, int], None]

_hook: SendHook | None = None
_runners: dict[Any, "_Runner"] = {}
_runners_lock = threading.Lock()


def set_send_hook(hook: SendHook | None) -> SendHook | None:
    """Test-only: install ``hook`` (None removes it); returns the previous one."""
    global _hook
    previous, _hook = _hook, hook
    return previous


class ThreadWork:
    """Work-like handle of a job on a group's collective thread."""

    __slots__ = ("_fut",)

    def __init__(self) -> None:
        self._fut: torch.futures.Future[Any] = torch.futures.Future()

    def wait(self) -> Any:
        return self._fut.wait()  # re-raises the job's error

    def is_completed(self) -> bool:
        return self._fut.done()

    def get_future(self) -> "torch.futures.Future[Any]":
        return self._fut


class _Runner:
    """One daemon thread running a group's jobs in submission order."""

    __slots__ = ("_jobs", "_thread")

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], ThreadWork]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ccomm-collective", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, work = self._jobs.get()
            # The job's references (its closure, the work, the result or error) are dropped
            # inside the completing() block: freeing a tensor releases and retakes the GIL,
            # which aborts the process once the interpreter finalizes (ccomm.exitguard).
            value: Any = None
            error: BaseException | None = None
            try:
                value = fn()
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller through the future
                error = exc  # completed after the except clause, which holds the error until it ends
            # set_result / set_exception wake the caller before retaking the GIL (ccomm.exitguard).
            with completing():
                if error is None:
                    work.get_future().set_result(value)
                else:
                    work.get_future().set_exception(error)
                del value, error, fn, work

    def submit(self, fn: Callable[[], Any]) -> ThreadWork:
        work = ThreadWork()
        self._jobs.put((fn, work))
        return work


def submit(group: dist.ProcessGroup | None, fn: Callable[[], Any]) -> ThreadWork:
    """Run ``fn`` on ``group``'s collective thread after every job submitted before it."""
    k: Any = "default" if group is None or group is dist.GroupMember.WORLD else group
    with _runners_lock:
        runner = _runners.get(k)
        if runner is None:
            runner = _runners[k] = _Runner()
    return runner.submit(fn)


def post(
    ops: Sequence[tuple[bool, torch.Tensor, int]], group: dist.ProcessGroup | None, step: int, rank: int
) -> list[Any]:
    """Post ``(is_send, tensor, peer)`` operations (group ranks) together; returns their works."""
    if not ops:
        return []
    hook = _hook
    p2p = []
    for is_send, t, peer in ops:
        if is_send and hook is not None:
            hook(step, rank, peer, t.numel() * t.element_size())
        # Looked up at call time: netsim.emulate patches dist.isend / dist.irecv.
        fn = dist.isend if is_send else dist.irecv
        p2p.append(dist.P2POp(fn, t, group=group, tag=TAG, group_peer=peer))
    return list(dist.batch_isend_irecv(p2p))


def wait_all(works: Sequence[Any], what: str) -> None:
    """Wait for every work; a backend failure becomes a `CommError` naming ``what``."""
    try:
        for w in works:
            w.wait()
    except RuntimeError as exc:  # DistBackendError and gloo errors are RuntimeErrors
        raise wrap_error(exc, what) from exc
