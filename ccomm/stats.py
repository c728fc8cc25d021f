"""Byte accounting for the payload transport (`ccomm.comm`).

What is counted
---------------
For every transport call, the bytes that THIS rank hands to torch.distributed as its own
contribution to the operation:

- ``payload_bytes``: the payload buffer this rank contributes (``payload.nbytes``): the
  buffer it all-reduces, the buffer it contributes to an all-gather, the buffer it sends
  in a ring ``send_recv``.
- ``header_bytes``: size headers this rank contributes when payload sizes are exchanged
  first (one int64 per all-gather or ``send_recv`` whose sizes are not known in advance).
- ``padding_bytes``: zero bytes appended to this rank's buffer so that an all-gather of
  payloads of different sizes can use one common size.

``bytes`` is their sum. Bytes received are not counted (every byte received was counted
on the rank that sent it). How many times a collective algorithm moves each contributed
byte over the network (about 2(p-1)/p for a ring all-reduce, (p-1) for a ring all-gather,
...) depends on the backend's algorithm and is the business of the cost model
(``netsim``), not of this module: the numbers here are algorithm-independent.

Records are grouped by ``key`` (a caller-chosen tag such as a bucket or layer name; the
transport uses the op name when no key is given) and by op (``"allreduce"``,
``"allgather"``, ``"send_recv"``). Calls that name their algorithm (``"ring"``,
``"doubling"``, ``"bruck"``, ``"tree"``: what ``algo="auto"`` chose) are also counted per
(op, algorithm): `CommStats.by_algo`. A log-depth all-gather of payloads whose sizes are
not known in advance sends one int64 header per block it forwards; those are its
``header_bytes``. A process-wide default `CommStats` collects every
call that does not pass its own; `snapshot()` and `reset()` act on it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from .validate import check_int

__all__ = [
    "OpStats",
    "CommStats",
    "Snapshot",
    "default_stats",
    "resolve",
    "snapshot",
    "reset",
    "total",
]


@dataclass(frozen=True)
class OpStats:
    """Counters of one (key, op) pair; all byte counts are this rank's contribution."""

    calls: int = 0
    payload_bytes: int = 0
    header_bytes: int = 0
    padding_bytes: int = 0

    @property
    def bytes(self) -> int:
        """Every byte this rank handed to torch.distributed: payload + headers + padding."""
        return self.payload_bytes + self.header_bytes + self.padding_bytes

    def __add__(self, other: "OpStats") -> "OpStats":
        return OpStats(
            self.calls + other.calls,
            self.payload_bytes + other.payload_bytes,
            self.header_bytes + other.header_bytes,
            self.padding_bytes + other.padding_bytes,
        )

    def __sub__(self, other: "OpStats") -> "OpStats":
        return OpStats(
            self.calls - other.calls,
            self.payload_bytes - other.payload_bytes,
            self.header_bytes - other.header_bytes,
            self.padding_bytes - other.padding_bytes,
        )


#: ``{key: {op: OpStats}}``: an immutable copy of the counters at one moment.
Snapshot = dict[str, dict[str, OpStats]]


class CommStats:
    """Thread-safe counters of calls and bytes per key and per op.

    Thread-safe because async transport handles and DDP communication hooks may record
    from threads other than the training loop's.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, OpStats]] = {}
        self._algo: dict[tuple[str, str, str], OpStats] = {}

    def record(
        self,
        op: str,
        key: str | None = None,
        *,
        payload_bytes: int = 0,
        header_bytes: int = 0,
        padding_bytes: int = 0,
        calls: int = 1,
        algo: str | None = None,
    ) -> None:
        """Add one call (or `calls` calls) of `op` under `key` (default: `op`), and under
        (op, `algo`) when the algorithm is given."""
        if not isinstance(op, str) or not op:
            raise ValueError(f"op={op!r} must be a non-empty string")
        if key is not None and not isinstance(key, str):
            raise ValueError(f"key={key!r} must be a string or None")
        if algo is not None and (not isinstance(algo, str) or not algo):
            raise ValueError(f"algo={algo!r} must be a non-empty string or None")
        delta = OpStats(
            check_int("calls", calls, 0),
            check_int("payload_bytes", payload_bytes, 0),
            check_int("header_bytes", header_bytes, 0),
            check_int("padding_bytes", padding_bytes, 0),
        )
        k = op if key is None else key
        with self._lock:
            per_op = self._data.setdefault(k, {})
            per_op[op] = per_op.get(op, OpStats()) + delta
            if algo is not None:
                ka = (k, op, algo)
                self._algo[ka] = self._algo.get(ka, OpStats()) + delta

    def snapshot(self) -> Snapshot:
        """A copy of all counters, ``{key: {op: OpStats}}``; later calls do not change it."""
        with self._lock:
            return {k: dict(per_op) for k, per_op in self._data.items()}

    def get(self, key: str, op: str | None = None) -> OpStats:
        """Counters of `key` for one `op`, or summed over its ops; zeros if never recorded."""
        with self._lock:
            per_op = self._data.get(key, {})
            if op is not None:
                return per_op.get(op, OpStats())
            return sum(per_op.values(), OpStats())

    def by_algo(self, key: str | None = None) -> dict[tuple[str, str], OpStats]:
        """Counters per ``(op, algo)``, summed over keys (or of one `key`); only calls that named one."""
        out: dict[tuple[str, str], OpStats] = {}
        with self._lock:
            for (k, op, algo), st in self._algo.items():
                if key is None or k == key:
                    out[(op, algo)] = out.get((op, algo), OpStats()) + st
        return out

    def total(self, op: str | None = None) -> OpStats:
        """Counters summed over every key (and over every op unless `op` is given)."""
        return total(self.snapshot(), op)

    def reset(self) -> None:
        """Forget every counter."""
        with self._lock:
            self._data.clear()
            self._algo.clear()

    def __repr__(self) -> str:
        t = self.total()
        return f"CommStats(keys={len(self._data)}, calls={t.calls}, bytes={t.bytes})"


_DEFAULT = CommStats()


def default_stats() -> CommStats:
    """The process-wide instance used when a transport call gets ``stats=None``."""
    return _DEFAULT


def resolve(stats: CommStats | None) -> CommStats:
    """`stats`, or the process-wide default when it is None."""
    if stats is None:
        return _DEFAULT
    if not isinstance(stats, CommStats):
        raise ValueError(f"stats: expected a CommStats or None, got {type(stats).__name__}")
    return stats


def snapshot() -> Snapshot:
    """Snapshot of the process-wide default counters."""
    return _DEFAULT.snapshot()


def reset() -> None:
    """Clear the process-wide default counters."""
    _DEFAULT.reset()


def total(snap: Snapshot, op: str | None = None) -> OpStats:
    """Sum a snapshot over keys (and over ops unless `op` is given)."""
    out = OpStats()
    for per_op in snap.values():
        for name, st in per_op.items():
            if op is None or name == op:
                out = out + st
    return out
