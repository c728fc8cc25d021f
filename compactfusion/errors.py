"""Errors raised by CompactFusion's runtime."""
from __future__ import annotations

from ccomm.residual import ConsistencyError

__all__ = ["CompactStateError", "BaseMismatchError"]


class CompactStateError(RuntimeError):
    """The mirrored state cannot serve this call (e.g. a key changed shape without a reset)."""


class BaseMismatchError(ConsistencyError):
    """`check_every` found ranks whose bases of a key differ (a ConsistencyError, hence a RuntimeError)."""
