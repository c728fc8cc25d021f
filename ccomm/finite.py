"""`all_finite(t)`: whether every element of a tensor is finite, at the cost of one sum.

1. Sum the tensor in float32 (float64 stays float64). An inf or NaN anywhere makes the sum
   inf or NaN, so a finite sum proves every element finite.
2. Only a non-finite sum, which finite values can also give by overflowing, falls back to
   the exact element-wise `isfinite(t).all()`.

On CPU the sum is 7-9x cheaper than `isfinite(t).all()` for a (256, 128) fp16/bf16/fp32
tensor (see the test module's benchmark note), which matters for per-layer checks on small
activations and per-step checks on whole gradients. One host sync either way.
"""
from __future__ import annotations

import torch

__all__ = ["all_finite"]


def all_finite(t: torch.Tensor) -> bool:
    """True iff no element of `t` is inf or NaN (integer and bool tensors are always finite)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    if t.numel() == 0:
        return True
    # Half and bfloat16 accumulate in float32; float64 and complex keep their own precision.
    acc = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t.sum()
    if bool(torch.isfinite(acc).all()):
        return True
    return bool(torch.isfinite(t).all())
