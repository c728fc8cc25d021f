"""``EmulatedProcessGroup``: a ProcessGroup that forwards each op and wraps its Work.

The shape is torchft's wrapper: every method issues the real operation on the inner group at
once and returns an :class:`~netsim.emulation._work.EmulatedWork` that completes at the modeled
time. Because it is a real ``torch.distributed.ProcessGroup`` subclass, the C++ DDP reducer
and the ``torch.distributed`` functions can call it directly.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ._work import EmulatedWork, WorkHost

__all__ = ["EmulatedProcessGroup", "Engine"]

logger = logging.getLogger(__name__)


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Engine(WorkHost, Protocol):
    """What the emulated group calls to time each real operation it forwards.

    :class:`netsim.emulation.Emulator` provides it. Every forwarded call reads
    :meth:`issue_time` before issuing the real work, then hands that work to one of the
    ``time_*`` methods, which return the :class:`EmulatedWork` completing at max(real, modeled).
    """

    def issue_time(self) -> float:
        """Emulation time at which the current call entered (the caller's, inside a patched call)."""
        ...

    def time_collective(self, kind: str, nbytes: int, inner: dist.Work, t_enter: float, value: Any,
                        root: int = 0) -> EmulatedWork:
        """Time a collective of ``kind`` over ``nbytes`` per rank."""
        ...

    def time_send(self, nbytes: int, dst: int, tag: int, inner: dist.Work, t_issue: float) -> EmulatedWork:
        """Time a point-to-point send to group rank ``dst``."""
        ...

    def time_recv(self, nbytes: int, src: int | None, tag: int, inner: dist.Work,
                  t_issue: float) -> EmulatedWork:
        """Time a receive from ``src`` (``None``: any source)."""
        ...


class EmulatedProcessGroup(dist.ProcessGroup):
    """Forwards to ``inner``; collectives, barrier and point-to-point ops are timed by ``emu``."""

    def __init__(self, inner: dist.ProcessGroup, emu: Engine) -> None:
        super().__init__(inner.rank(), inner.size())
        self.inner = inner
        self._emu = emu
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ naming
    # Not the inner backend's name: DDP would then look up a registered backend of that type
    # on this wrapper, which has none.
    def getBackendName(self) -> str:  # noqa: N802 - the C++ name torch looks up
        return "emulated"

    def name(self) -> str:
        return "emulated"

    def __repr__(self) -> str:
        return f"EmulatedProcessGroup(rank={self.rank()}, size={self.size()}, inner={self.inner.name()})"

    # ------------------------------------------------------------------ collectives
    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> EmulatedWork:
        opts = opts if opts is not None else dist.AllreduceOptions()
        t = self._emu.issue_time()
        return self._emu.time_collective("allreduce", _nbytes(tensors), self.inner.allreduce(tensors, opts), t, tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> EmulatedWork:
        opts = opts if opts is not None else dist.AllreduceCoalescedOptions()
        t = self._emu.issue_time()
        return self._emu.time_collective("allreduce", _nbytes(tensors), self.inner.allreduce_coalesced(tensors, opts), t, tensors)

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> EmulatedWork:
        opts = opts if opts is not None else dist.AllgatherOptions()
        t = self._emu.issue_time()
        return self._emu.time_collective("allgather", _nbytes(inputs), self.inner.allgather(outputs, inputs, opts), t, outputs)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> EmulatedWork:  # noqa: A002
        opts = opts if opts is not None else dist.AllgatherOptions()
        t = self._emu.issue_time()
        work = self.inner.all_gather_single(output, input, opts)
        return self._emu.time_collective("allgather", _nbytes([input]), work, t, [output])

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> EmulatedWork:  # noqa: A002
        opts = opts if opts is not None else dist.AllgatherOptions()
        t = self._emu.issue_time()
        work = self.inner._allgather_base(output, input, opts)
        return self._emu.time_collective("allgather", _nbytes([input]), work, t, [output])

    def reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any = None) -> EmulatedWork:
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        t = self._emu.issue_time()
        nbytes = sum(_nbytes(lst) for lst in inputs)  # the cost model's S: each rank's whole input
        return self._emu.time_collective("reduce_scatter", nbytes, self.inner.reduce_scatter(outputs, inputs, opts), t, outputs)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> EmulatedWork:  # noqa: A002
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        t = self._emu.issue_time()
        work = self.inner.reduce_scatter_single(output, input, opts)
        return self._emu.time_collective("reduce_scatter", _nbytes([input]), work, t, [output])

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> EmulatedWork:  # noqa: A002
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        t = self._emu.issue_time()
        work = self.inner._reduce_scatter_base(output, input, opts)
        return self._emu.time_collective("reduce_scatter", _nbytes([input]), work, t, [output])

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> EmulatedWork:
        opts = opts if opts is not None else dist.BroadcastOptions()
        t = self._emu.issue_time()
        work = self.inner.broadcast(tensors, opts)
        return self._emu.time_collective("broadcast", _nbytes(tensors), work, t, tensors, root=int(opts.rootRank))

    def barrier(self, opts: Any = None) -> EmulatedWork:
        opts = opts if opts is not None else dist.BarrierOptions()
        t = self._emu.issue_time()
        return self._emu.time_collective("barrier", 0, self.inner.barrier(opts), t, [])

    # ------------------------------------------------------------------ point to point
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> EmulatedWork:
        t = self._emu.issue_time()
        return self._emu.time_send(_nbytes(tensors), dst, tag, self.inner.send(tensors, dst, tag), t)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> EmulatedWork:
        t = self._emu.issue_time()
        return self._emu.time_recv(_nbytes(tensors), src, tag, self.inner.recv(tensors, src, tag), t)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> EmulatedWork:
        t = self._emu.issue_time()
        return self._emu.time_recv(_nbytes(tensors), None, tag, self.inner.recv_anysource(tensors, tag), t)

    # ------------------------------------------------------------------ not modeled
    def _untimed(self, name: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("netsim.emulate does not model %s; it runs at the real transport's speed", name)

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        self._untimed("reduce")
        return self.inner.reduce(tensors, opts)

    def gather(self, outputs: Any, inputs: Any, opts: Any) -> dist.Work:
        self._untimed("gather")
        return self.inner.gather(outputs, inputs, opts)

    def scatter(self, outputs: Any, inputs: Any, opts: Any) -> dist.Work:
        self._untimed("scatter")
        return self.inner.scatter(outputs, inputs, opts)

    def alltoall(self, outputs: Any, inputs: Any, opts: Any) -> dist.Work:
        self._untimed("alltoall")
        return self.inner.alltoall(outputs, inputs, opts)

    def alltoall_base(self, output: Any, input: Any, output_split_sizes: Any, input_split_sizes: Any, opts: Any) -> dist.Work:  # noqa: A002
        self._untimed("alltoall_base")
        return self.inner.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    def allgather_coalesced(self, outputs: Any, inputs: Any, opts: Any = None) -> dist.Work:
        self._untimed("allgather_coalesced")
        opts = opts if opts is not None else dist.AllgatherOptions()
        return self.inner.allgather_coalesced(outputs, inputs, opts)
