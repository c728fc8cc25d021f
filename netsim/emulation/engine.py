"""``netsim.emulate``: in-process emulation of a slow network for real torch.distributed traffic.

::

    with netsim.emulate(Link(50, 10), seed=0) as emu:
        dist.all_reduce(t)                               # default group: patched, emulated
        ddp = DDP(model, process_group=emu.group)        # or register_comm_hook(None, emu.allreduce_hook)

Every operation is issued on the real group at once and completes at max(real, modeled),
where the model is the reservation rule of ``netsim.model.reserve`` over the link or topology: a
message waits for bandwidth already promised to earlier messages, so concurrent messages share
a link. Point-to-point senders reserve their uplink and tell the receiver (seq, start, fin) on
a gloo side group; collectives all-gather entry times and link state on it and every rank
replays the same schedule. Nothing needs root or touches the environment. Emulation only adds
delay, so it is accurate while the real transport takes less than the modeled time
(``emu.stats.late_ops`` counts the operations where it did not).

Limits, by design or not yet done:

* A receiver reserves its shared downlink when it learns of a message (on wait, poll or
  future), so with several senders into one rank the service order follows that, not the
  senders' issue order; totals still match the rule.
* ``recv(src=None)`` learns the sender after the data is in, then fetches the header; mixing
  it with receives from a named source on the same pair and tag may pair headers wrongly.
* ``batch_isend_irecv`` sends one header per message (not one batch); on NCCL the real ops are
  still coalesced. NCCL itself is untested here (no GPU).
* Functional collectives, reduce, gather, scatter and all-to-all run unemulated and warn once.
* Emulating a subgroup uses torch's locally synchronized groups, whose names repeat after a
  ``destroy_process_group``; emulate the whole world where possible.
"""
from __future__ import annotations

import functools
import logging
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ._clock import EmuVirtualClock
from ._patch import PATCH_MARK, Patch, group_mapper, originals
from ._pg import EmulatedProcessGroup
from ._sched import collective_schedule
from ._state import owned_size, pack_owned, replay, unpack_owned
from ._sync import agree_clock
from ._work import EmulatedWork, EmuOp, Timer
from ..model.link import Link
from ..model.reserve import Reserver
from ..model.topo import Topo

__all__ = ["emulate", "Emulator", "EmulateStats", "EmulatedProcessGroup", "EmulatedWork", "LATE_SLACK_S"]

logger = logging.getLogger(__name__)

#: An operation whose real transport finished this much after its modeled due time is late.
LATE_SLACK_S = 1e-3
_CLOCKS = ("wall", "virtual")
_HEADER = 4  # seq, start, fin, nbytes


@dataclass(frozen=True)
class EmulateStats:
    """What emulation did on this rank (times in seconds)."""

    ops: int
    late_ops: int
    max_late_s: float
    bytes_sent: float
    bytes_received: float
    busy_s: float  # union of [issue, due] over this rank's operations
    uplink_busy_s: float  # serialization time of this rank's outgoing messages


def _noop() -> None:
    """Nothing to undo."""


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class Emulator:
    """The context manager :func:`emulate` returns; see the module docstring."""

    def __init__(
        self,
        link_or_topo: Link | Topo,
        group: dist.ProcessGroup | None = None,
        *,
        seed: int = 0,
        clock: str = "wall",
        patch: bool = True,
        timeout_s: float = 120.0,
    ) -> None:
        if not isinstance(link_or_topo, (Link, Topo)):
            raise ValueError(f"link_or_topo must be a netsim.Link or netsim.Topo, got {type(link_or_topo).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an integer >= 0")
        if clock not in _CLOCKS:
            raise ValueError(f"clock={clock!r} must be one of {_CLOCKS}")
        if not isinstance(patch, bool):
            raise ValueError(f"patch={patch!r} must be a bool")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s={timeout_s!r} must be finite and > 0")
        self._spec = link_or_topo
        self._group_arg = group
        self.seed = seed
        self.clock_kind = clock
        self._do_patch = patch
        self.timeout_s = float(timeout_s)
        self._active = False

    # ================================================================== entry and exit
    def __enter__(self) -> Emulator:
        if not dist.is_initialized():
            raise RuntimeError("netsim.emulate needs torch.distributed initialized (init_process_group) first")
        if self._active:
            raise RuntimeError("this Emulator is already active")
        if getattr(dist.all_reduce, PATCH_MARK, False):
            raise RuntimeError("netsim.emulate is already patching torch.distributed; emulators do not nest")
        default = dist.distributed_c10d._get_default_group()
        self.inner: dist.ProcessGroup = default if self._group_arg is None else self._group_arg
        self._is_default = self.inner is default
        self.rank = self.inner.rank()
        self.n = self.inner.size()
        self._global_ranks = dist.get_process_group_ranks(self.inner)
        if isinstance(self._spec, Topo):
            if self._spec.n != self.n:
                raise ValueError(f"topo.n={self._spec.n} must equal the group size {self.n}")
            self.topo = self._spec
        else:
            self.topo = Topo(self.n, self._spec)
        self._orig = originals()
        self._res = Reserver(self.topo, self.seed)
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._ops = 0
        self._late = 0
        self._max_late = 0.0
        self._sent = 0.0
        self._received = 0.0
        self._intervals: list[tuple[float, float]] = []
        self._headers: list[dist.Work] = []
        self._call = threading.local()
        timeout = timedelta(seconds=self.timeout_s)
        # Two gloo side groups: collective metadata (resolver thread) and p2p headers, so
        # their messages never interleave. For the whole world, plain new_group: its names
        # come from a counter. torch names locally synchronized groups by a hash of the ranks
        # and the live group count, which repeats after any destroy_process_group, so they
        # are used only when a subgroup is emulated (then only its members need to enter).
        local = self.n != dist.get_world_size()
        self._side = dist.new_group(self._global_ranks, backend="gloo", timeout=timeout, use_local_synchronization=local)
        self._side_p2p = dist.new_group(self._global_ranks, backend="gloo", timeout=timeout, use_local_synchronization=local)
        try:
            self.clock = agree_clock(self._side, self.rank, self.n, self._global_ranks[0], self.clock_kind, self._orig)
        except BaseException:
            for g in (self._side_p2p, self._side):
                dist.destroy_process_group(g)
            raise
        self._wrapper = EmulatedProcessGroup(self.inner, self)
        ranks_map = dist.distributed_c10d._world.pg_group_ranks
        ranks_map[self._wrapper] = {g: i for i, g in enumerate(self._global_ranks)}
        self._tasks: queue.SimpleQueue[tuple[EmuOp, Callable[[], float]] | None] = queue.SimpleQueue()
        self._resolver = threading.Thread(target=self._resolve_loop, name="netsim-emulate-resolver", daemon=True)
        self._resolver.start()
        self.timer = Timer(self)
        self._patch: Patch | None = None
        if self._do_patch:
            self._patch = Patch(self._orig)
            self._patch.install(self._replacements())
        self._active = True
        logger.debug("emulate: rank %d of %d, topo %r, clock %s", self.rank, self.n, self.topo, self.clock_kind)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Restore torch.distributed and release the side groups (collective, like entry)."""
        if not self._active:
            return
        self._active = False
        if self._patch is not None:
            self._patch.restore()
        self._tasks.put(None)
        self._resolver.join(self.timeout_s)
        for w in self._headers:
            try:
                w.wait(timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:  # a receiver that never posted its header receive
                logger.warning("emulate: a p2p header was not delivered: %s", exc)
        self._headers.clear()
        self.timer.close(self.timeout_s)
        try:
            self._orig["barrier"](group=self._side)
        finally:
            dist.distributed_c10d._world.pg_group_ranks.pop(self._wrapper, None)
            for g in (self._side_p2p, self._side):
                dist.destroy_process_group(g)

    # ================================================================== public API
    @property
    def group(self) -> EmulatedProcessGroup:
        """The emulated process group: pass it to DDP or to torch.distributed calls."""
        self._check_active()
        return self._wrapper

    def now(self) -> float:
        """Emulation seconds since the ranks' common t0."""
        return self.clock.now()

    def compute(self, seconds: float) -> None:
        """Account ``seconds`` of compute: the virtual clock advances, the wall clock sleeps."""
        if isinstance(self.clock, EmuVirtualClock):
            self.clock.compute(seconds)
        else:
            if not seconds >= 0:
                raise ValueError(f"seconds must be >= 0, got {seconds}")
            self.clock.sleep_until(self.clock.now() + seconds)

    def allreduce_hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """DDP comm hook: the default mean all-reduce, on the emulated group."""
        tensor = bucket.buffer().div_(self.n)
        work = self._wrapper.allreduce([tensor], dist.AllreduceOptions())
        return work.get_future().then(lambda fut: fut.value()[0])

    @property
    def stats(self) -> EmulateStats:
        with self._stats_lock:
            intervals = list(self._intervals)
            ops, late, max_late, sent, received = self._ops, self._late, self._max_late, self._sent, self._received
        with self._lock:
            mine = [("up", self.rank)] if self.topo.shared else [("pair", self.rank, j) for j in range(self.n)]
            up = sum(self._res.busy_s.get(r, 0.0) for r in mine)
        return EmulateStats(ops, late, max_late, sent, received, _union_length(intervals), up)

    # ================================================================== machinery
    def _check_active(self) -> None:
        if not self._active:
            raise RuntimeError("netsim.emulate is not active (use it as a context manager)")

    # ---- the Engine protocol (`_pg.Engine`, `_work.WorkHost`): what the emulated group and its
    # work handles call; they see only these methods and `clock`, `timeout_s`, `timer`.

    def issue_time(self) -> float:
        """An operation's start: when the outermost patched call began, else now."""
        self._check_active()
        t = getattr(self._call, "t", None)
        return max(0.0, self.clock.now() if t is None else t)

    def _on_call(self) -> Callable[[], None]:
        # Only the outermost patched call stamps the time: dist.send calls dist.isend inside.
        if getattr(self._call, "t", None) is not None:
            return _noop
        self._call.t = self.clock.now()

        def clear() -> None:
            self._call.t = None

        return clear

    def _record(self, op: EmuOp, sent: float, received: float) -> None:
        with self._stats_lock:
            self._ops += 1
            self._sent += sent
            self._received += received
            if op.due_s is not None:
                self._intervals.append((op.issued_s, op.due_s))

    def note_real_done(self, op: EmuOp, t: float) -> None:
        if op.due_s is None or t <= op.due_s + LATE_SLACK_S:
            return
        with self._stats_lock:
            if op.late_noted:
                return
            op.late_noted = True
            self._late += 1
            self._max_late = max(self._max_late, t - op.due_s)
            first = self._late == 1
        if first:
            logger.warning(
                "emulate: a %s finished %.1f ms after its modeled time; the real transport is slower "
                "than the model, so measured times exceed it (see emu.stats.late_ops)",
                op.kind, (t - op.due_s) * 1e3,
            )

    def _resolve_loop(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            op, fn = item
            try:
                op.set_due(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the operation's waiters
                logger.debug("emulate: %s failed to resolve", op.kind, exc_info=True)
                op.fail(exc)

    def time_collective(self, kind: str, nbytes: int, inner: dist.Work, t_enter: float, value: Any, root: int = 0) -> EmulatedWork:
        op = EmuOp(kind, nbytes, t_enter)
        me, n = self.rank, self.n

        def resolve() -> float:
            with self._lock:
                row = [t_enter, float(nbytes)] + pack_owned(self._res, me)
            width = 2 + owned_size(self._res)
            out = torch.empty(n * width, dtype=torch.float64)
            gather = self._orig.get("all_gather_single", self._orig["all_gather_into_tensor"])
            gather(out, torch.tensor(row, dtype=torch.float64), group=self._side)
            rows = out.view(n, width).tolist()
            steps = collective_schedule(kind, n, [r[1] for r in rows], root=root)
            with self._lock:
                for q in range(n):
                    unpack_owned(self._res, q, rows[q][2:], keep_later=q == me)
                result = replay(self._res, steps, [r[0] for r in rows])
            done = result.done_s[me]
            op.due_s = done
            self._record(op, result.bytes_sent[me], result.bytes_received[me])
            return done

        self._tasks.put((op, resolve))
        return EmulatedWork(inner, op, self, value)

    def time_send(self, nbytes: int, dst: int, tag: int, inner: dist.Work, t_issue: float) -> EmulatedWork:
        op = EmuOp("send", nbytes, t_issue)
        me = self.rank

        def resolve() -> float:
            with self._lock:
                seq = self._res.take_seq(me, dst)
                res = [("up", me)] if self.topo.shared else [("pair", me, dst)]
                start, fin = self._res.occupy(res, me, dst, nbytes, t_issue)
            header = torch.tensor([seq, start, fin, nbytes], dtype=torch.float64)
            self._headers = [w for w in self._headers if not w.is_completed()]
            self._headers.append(self._side_p2p.send([header], dst, tag))
            op.due_s = fin
            self._record(op, nbytes, 0.0)
            return fin

        self._tasks.put((op, resolve))
        return EmulatedWork(inner, op, self)

    def time_recv(self, nbytes: int, src: int | None, tag: int, inner: dist.Work, t_issue: float) -> EmulatedWork:
        me = self.rank
        header = torch.zeros(_HEADER, dtype=torch.float64)
        hwork: dist.Work | None = None if src is None else self._side_p2p.recv([header], src, tag)
        op = EmuOp("recv", nbytes, t_issue)
        work = EmulatedWork(inner, op, self)

        def resolve(timeout_s: float | None) -> float:
            nonlocal hwork
            secs = timeout_s if timeout_s is not None else self.timeout_s
            peer = src
            if hwork is None:
                # recv from any source: the header's sender is known only once the data is in.
                work.wait_inner(secs)
                peer = inner._source_rank()
                hwork = self._side_p2p.recv([header], peer, tag)
            # The header travels on the real transport too: one that was still in flight
            # when we started waiting and came in after the modeled arrival makes this
            # receive late, even when the data itself was on time.
            header_pending = not hwork.is_completed()
            hwork.wait(timedelta(seconds=secs))
            assert peer is not None
            seq, start, fin, size = header.tolist()
            with self._lock:
                if self.topo.shared:
                    start, fin = self._res.occupy([("down", me)], peer, me, size, start)
                arr = self._res.arrival(peer, me, int(seq), size, fin, start)
            op.due_s = max(arr, t_issue)
            self._record(op, 0.0, size)
            if header_pending:
                self.note_real_done(op, self.clock.now())
            return op.due_s

        def ready() -> bool:
            return hwork.is_completed() if hwork is not None else inner.is_completed()

        op.set_lazy(resolve, ready)
        return work

    # ================================================================== patching
    def _swap_group(self, group: Any) -> Any:
        if group is None or group is dist.GroupMember.WORLD:
            return self._wrapper if self._is_default else group
        return self._wrapper if group is self.inner else group

    def _replacements(self) -> dict[str, Callable[..., Any]]:
        out = {
            name: group_mapper(fn, self._swap_group, self._on_call)
            for name, fn in self._orig.items()
            if name != "batch_isend_irecv"
        }
        batch = self._batch_isend_irecv

        @functools.wraps(self._orig["batch_isend_irecv"])
        def batch_isend_irecv(p2p_op_list: list[dist.P2POp]) -> list[dist.Work]:
            done = self._on_call()
            try:
                return batch(p2p_op_list)
            finally:
                done()

        out["batch_isend_irecv"] = batch_isend_irecv
        self._patched_isend = out["isend"]
        for fn in out.values():
            setattr(fn, PATCH_MARK, True)
        return out

    def _batch_isend_irecv(self, p2p_op_list: list[dist.P2POp]) -> list[dist.Work]:
        """The real ops as one batch on the inner group (coalesced where the backend can), each wrapped."""
        if not p2p_op_list or self._swap_group(p2p_op_list[0].group) is not self._wrapper:
            return self._orig["batch_isend_irecv"](p2p_op_list)
        c10d = dist.distributed_c10d
        c10d._check_p2p_op_list(p2p_op_list)
        sends = [p.op in (self._orig["isend"], self._patched_isend) for p in p2p_op_list]
        t = self.issue_time()
        device = p2p_op_list[0].tensor.device
        inner = self.inner

        def issue() -> list[dist.Work]:
            return [
                inner.send([p.tensor], p.group_peer, p.tag) if s else inner.recv([p.tensor], p.group_peer, p.tag)
                for p, s in zip(p2p_op_list, sends)
            ]

        if type(inner) is dist.ProcessGroup and inner._get_backend(device).supports_coalescing:
            with c10d._coalescing_manager(inner, device, async_ops=True) as cm:
                issue()
            works: list[dist.Work] = list(cm.works)
        else:
            works = issue()
        out: list[dist.Work] = []
        for k, (p, s) in enumerate(zip(p2p_op_list, sends)):
            w = works[k] if len(works) == len(p2p_op_list) else works[0]
            size = p.tensor.numel() * p.tensor.element_size()
            out.append(self.time_send(size, p.group_peer, p.tag, w, t) if s else self.time_recv(size, p.group_peer, p.tag, w, t))
        return out


# DDP's register_comm_hook compares the hook's annotations with the real types, and this
# module's postponed (string) annotations would fail that check.
Emulator.allreduce_hook.__annotations__ = {
    "state": object,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def emulate(
    link_or_topo: Link | Topo,
    group: dist.ProcessGroup | None = None,
    *,
    seed: int = 0,
    clock: str = "wall",
    patch: bool = True,
    timeout_s: float = 120.0,
) -> Emulator:
    """Emulate ``link_or_topo`` for ``group`` (default: WORLD); use as ``with emulate(...) as emu``.

    Entering and leaving are collective over ``group``. ``clock="virtual"`` never sleeps: each
    rank's clock moves by its compute (wall time between calls, or ``emu.compute``) and the
    modeled communication. ``patch=True`` rebinds the ``torch.distributed`` functions so calls
    on ``group`` are emulated, and restores them on exit.
    """
    return Emulator(link_or_topo, group, seed=seed, clock=clock, patch=patch, timeout_s=timeout_s)
