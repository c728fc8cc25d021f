"""Errors of the DeCo-SGD runtime (docs/design/deco_sgd.md#validation-and-faults).

Each carries the context a user needs to find the failing step without a debugger: the
step, the exchange key, the staleness in force and the collective involved.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["DecoCommError", "NonFiniteGradientError", "DecoDesyncError"]


class DecoCommError(RuntimeError):
    """A data or control exchange failed or timed out (a peer died or stopped answering)."""

    def __init__(self, message: str, *, step: int | None = None, key: str | None = None,
                 staleness: int | None = None, collective: str | None = None) -> None:
        ctx = f"step={step}, key={key!r}, tau={staleness}, collective={collective}"
        super().__init__(f"{message} [{ctx}]")
        self.step = step
        self.key = key
        self.staleness = staleness
        self.collective = collective


class NonFiniteGradientError(FloatingPointError):
    """A rank contributed a non-finite gradient (or an aggregate decoded non-finite)."""

    def __init__(self, step: int, ranks: Sequence[int], detail: str = "") -> None:
        self.step = step
        self.ranks = tuple(ranks)
        extra = f": {detail}" if detail else ""
        super().__init__(f"non-finite gradient at step {step} on rank(s) {list(self.ranks)}{extra}")


class DecoDesyncError(RuntimeError):
    """Ranks disagree on replicated state (step, ratio, staleness, queue) that must match."""
