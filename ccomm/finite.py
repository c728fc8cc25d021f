"""`all_finite(t)`: whether every element of a tensor (or of several) is finite, at the cost of one sum.

1. Sum each tensor in float32 (float64 and complex keep their precision); for several
   tensors, add the partial sums in float64. An inf or NaN anywhere makes the total inf or
   NaN, so a finite total proves every element finite, with one host sync.
2. Only a non-finite total, which finite values can also give by overflowing, falls back to
   the exact element-wise `isfinite(t).all()` per tensor.

On CPU the sum is 7-9x cheaper than `isfinite(t).all()` for a (256, 128) fp16/bf16/fp32
tensor (see the test module's benchmark note), which matters for per-layer checks on small
activations and per-step checks on whole gradients. Several tensors (a gradient bucket's
parameters) cost one sync, not one per tensor.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["all_finite", "NonFiniteError", "require_finite"]


def _partial(t: torch.Tensor) -> torch.Tensor:
    # Half and bfloat16 accumulate in float32; float64 and complex keep their own precision.
    return t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t.sum()


def all_finite(t: torch.Tensor | Iterable[torch.Tensor]) -> bool:
    """True iff no element of `t` (a tensor or an iterable of tensors) is inf or NaN.

    Integer and bool tensors are always finite.
    """
    ts = [t] if isinstance(t, torch.Tensor) else list(t)
    floats = [x for x in ts if (x.is_floating_point() or x.is_complex()) and x.numel()]
    if not floats:
        return True
    if len(floats) == 1:
        acc = _partial(floats[0])
    else:
        # |complex| keeps inf and NaN; float64 holds any sum of float32 partials without overflow.
        dev = floats[0].device
        acc = torch.stack([(p.abs() if p.is_complex() else p).to(dev, torch.float64)
                           for p in map(_partial, floats)]).sum()
    if bool(torch.isfinite(acc).all()):
        return True
    return all(bool(torch.isfinite(x).all()) for x in floats)


class NonFiniteError(ValueError):
    """A tensor holding inf or NaN was given where only finite values may be kept."""


def require_finite(t: torch.Tensor | Iterable[torch.Tensor], what: str) -> None:
    """Raise `NonFiniteError` naming `what` unless every element of `t` is finite."""
    if not all_finite(t):
        raise NonFiniteError(
            f"{what}: holds inf or NaN; refused so it is not kept in the state "
            "(pass allow_nonfinite=True to keep non-finite values)"
        )
