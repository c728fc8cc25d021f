"""Rebinding ``torch.distributed`` functions so calls on the default group are emulated.

Each patched function only swaps its ``group`` argument for the emulated group when it names
the group being emulated (``None``/WORLD for the default group), then calls the original, so
the originals' checks and rank translation still apply and emulation happens exactly once,
inside :class:`~netsim.emulation._pg.EmulatedProcessGroup`. Both ``torch.distributed`` and
``torch.distributed.distributed_c10d`` are patched: the latter's globals are what
``P2POp`` checks ``op`` against and what ``send`` calls ``isend`` through.
"""
from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["PATCH_MARK", "PATCHED_NAMES", "FUNCTIONAL_NAMES", "Patch", "originals", "group_mapper", "warn_once"]

logger = logging.getLogger(__name__)

#: Attribute set on every patched function (nested emulators are refused).
PATCH_MARK = "_netsim_emulate_patched"

PATCHED_NAMES: tuple[str, ...] = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "_reduce_scatter_base",
    "broadcast",
    "barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)
_MODULES: tuple[types.ModuleType, ...] = (dist, c10d)

#: Functional collectives (``torch.distributed._functional_collectives``): not emulated, since
#: they are traced ops without Work handles; while emulation is on they warn once and run.
FUNCTIONAL_NAMES: tuple[str, ...] = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather_tensor",
    "all_gather_tensor_autograd",
    "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor",
    "reduce_scatter_tensor_autograd",
    "reduce_scatter_tensor_coalesced",
    "broadcast",
    "all_to_all_single",
    "all_to_all_single_autograd",
    "permute_tensor",
)
_warned_functional = False


class Patch:
    """Installs patched functions into both modules and puts the originals back exactly."""

    def __init__(self, originals: dict[str, Callable[..., Any]]) -> None:
        self.originals = originals
        self._saved: list[tuple[types.ModuleType, str, Any]] = []

    def install(self, replacements: dict[str, Callable[..., Any]]) -> None:
        for mod in _MODULES:
            for name, fn in replacements.items():
                if hasattr(mod, name):
                    self._saved.append((mod, name, getattr(mod, name)))
                    setattr(mod, name, fn)
        try:
            import torch.distributed._functional_collectives as funcol  # noqa: PLC0415
        except ImportError:  # pragma: no cover - every supported torch has it
            return
        for name in FUNCTIONAL_NAMES:
            if hasattr(funcol, name):
                orig = getattr(funcol, name)
                self._saved.append((funcol, name, orig))
                setattr(funcol, name, warn_once(orig))

    def restore(self) -> None:
        while self._saved:
            mod, name, value = self._saved.pop()
            setattr(mod, name, value)


def originals() -> dict[str, Callable[..., Any]]:
    """The current (unpatched) functions, as found in ``distributed_c10d``."""
    return {name: getattr(c10d, name) for name in PATCHED_NAMES if hasattr(c10d, name)}


def group_mapper(
    orig: Callable[..., Any], swap: Callable[[Any], Any], on_call: Callable[[], Callable[[], None]] | None = None
) -> Callable[..., Any]:
    """``orig`` with its ``group`` argument passed through ``swap``.

    ``on_call()`` runs first and returns what to run on the way out; emulate uses it to take
    an operation's start time at the user's call, before torch's own argument handling."""
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def patched(*args: Any, **kwargs: Any) -> Any:
        done = on_call() if on_call is not None else None
        try:
            bound = sig.bind(*args, **kwargs)
            if "group" in bound.arguments:
                bound.arguments["group"] = swap(bound.arguments["group"])
            elif "group" in sig.parameters:
                bound.arguments["group"] = swap(None)
            return orig(*bound.args, **bound.kwargs)
        finally:
            if done is not None:
                done()

    return patched


def warn_once(orig: Callable[..., Any]) -> Callable[..., Any]:
    """``orig`` unchanged, but the first call in this process logs that it is not emulated."""

    @functools.wraps(orig)
    def passthrough(*args: Any, **kwargs: Any) -> Any:
        global _warned_functional
        if not _warned_functional:
            _warned_functional = True
            logger.warning(
                "netsim.emulate does not cover functional collectives (%s): they run at the real "
                "transport's speed", orig.__name__,
            )
        return orig(*args, **kwargs)

    return passthrough
