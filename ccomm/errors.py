"""Errors of the transport (`ccomm.comm`) and of the fail-fast rule (`ccomm.failfast`)."""
from __future__ import annotations

__all__ = ["CommError", "CommTimeoutError"]


class CommError(RuntimeError):
    """torch.distributed failed during a transport call (peer lost, backend error)."""


class CommTimeoutError(CommError, TimeoutError):
    """The process group's timeout expired: a peer died or stopped taking part."""
