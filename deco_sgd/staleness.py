"""The in-flight FIFO that realises staleness τ
(docs/design/deco_sgd.md#staleness-model, docs/design/deco_sgd.md#changing-ratio-and-staleness).

Entry s is launched at step s and applied at the end of step s + τ. The FIFO only does the
bookkeeping: which entries to pop when, and the counters behind the invariant

    launched == applied + skipped + len(fifo)      (at every step boundary)

Popping happens through `pop_due(tau)`, which returns every entry that is due under the
staleness in force *now*; that single rule gives both transitions of τ:

- τ grows (deepen): fewer entries are due, so τ' − τ steps pop nothing (fill steps whose
  gradients stay queued, never lost);
- τ shrinks (drain): τ − τ' + 1 entries are due at once and come out oldest first.

An entry leaves the FIFO once and is then settled exactly once with `settle(applied=...)`,
so no entry can be applied twice.
"""
from __future__ import annotations

from collections import deque
from typing import Generic, Iterator, Protocol, TypeVar

__all__ = ["InFlightFifo", "Sequenced"]


class Sequenced(Protocol):
    seq: int


E = TypeVar("E", bound=Sequenced)


class InFlightFifo(Generic[E]):
    """Oldest-first queue of in-flight exchanges with launch/apply/skip accounting."""

    __slots__ = ("_q", "launched", "applied", "skipped", "_unsettled")

    def __init__(self) -> None:
        self._q: deque[E] = deque()
        self.launched = 0
        self.applied = 0
        self.skipped = 0
        # Popped but not yet settled; the invariant counts them as still in flight.
        self._unsettled: set[int] = set()

    def push(self, entry: E) -> None:
        if self._q and entry.seq <= self._q[-1].seq:
            raise ValueError(f"entry.seq: must increase, got {entry.seq} after {self._q[-1].seq}")
        self._q.append(entry)
        self.launched += 1

    def due_count(self, tau: int, pending: int = 0) -> int:
        """How many entries are due once `pending` more are pushed, under staleness `tau`."""
        if tau < 0:
            raise ValueError(f"tau: must be >= 0, got {tau}")
        return max(0, len(self._q) + pending - tau)

    def pop_due(self, tau: int) -> list[E]:
        """Remove and return the entries due under `tau`, oldest first."""
        out = [self._q.popleft() for _ in range(self.due_count(tau))]
        self._unsettled.update(e.seq for e in out)
        return out

    def pop_all(self) -> list[E]:
        """Remove every entry (flush, drain-mode checkpoint)."""
        return self.pop_due(0)

    def settle(self, entry: E, *, applied: bool) -> None:
        """Record that a popped entry was applied or skipped; exactly once per entry."""
        if entry.seq not in self._unsettled:
            raise ValueError(f"entry {entry.seq}: not popped, or already settled")
        self._unsettled.discard(entry.seq)
        if applied:
            self.applied += 1
        else:
            self.skipped += 1

    def check(self) -> None:
        """Assert the invariant; a violation is a bug in the runtime, not a user error."""
        inflight = len(self._q) + len(self._unsettled)
        if self.launched != self.applied + self.skipped + inflight:
            raise AssertionError(
                f"FIFO invariant broken: launched={self.launched} != applied={self.applied} + "
                f"skipped={self.skipped} + in flight={inflight}"
            )

    def restore(self, entries: list[E], launched: int, applied: int, skipped: int) -> None:
        """Rebuild from a checkpoint: entries oldest first plus the counters."""
        self._q = deque(entries)
        self._unsettled = set()
        self.launched, self.applied, self.skipped = launched, applied, skipped
        self.check()

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self._q]

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[E]:
        return iter(list(self._q))
