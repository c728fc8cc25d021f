"""`ErrorFeedback`: keyed memory of what compression has not yet delivered.

Per key (e.g. a parameter name), one step of error-feedback compression is:
1. corrected = compensate(key, x)      -> x + e[key]   (x itself on first use)
2. payload = codec.encode(corrected); decoded = codec.decode(payload)
3. update(key, corrected, decoded)     -> e[key] = corrected - decoded
Summed over steps, decoded messages plus the final residual equal the summed inputs, so
no gradient mass is ever lost, only delayed.

Non-finite values are refused by default (`NonFiniteError` from `update`, and from
`load_state_dict`), because a NaN kept in a residual would poison every later step of
its key until `reset()`; `allow_nonfinite=True` keeps them.

A key whose shape changes (DDP rebuilds its buckets after the first iteration) is reset
with a warning instead of failing: the residual of a differently-shaped tensor means
nothing for the new one.
"""
from __future__ import annotations

import warnings
from typing import Any, Hashable, Iterator, Mapping

import torch

from .finite import require_finite

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Residuals keyed by any hashable, picklable key.

    `residual_dtype=None` stores each residual in the dtype of its tensor; pass
    `torch.float32` to keep fp16/bf16 residuals from losing small components.
    `allow_nonfinite=False` (default) refuses a residual holding inf or NaN.
    """

    __slots__ = ("_res", "residual_dtype", "allow_nonfinite")

    def __init__(self, *, residual_dtype: torch.dtype | None = None, allow_nonfinite: bool = False) -> None:
        if not isinstance(allow_nonfinite, bool):
            raise ValueError(f"allow_nonfinite={allow_nonfinite!r}: must be true or false")
        self._res: dict[Hashable, torch.Tensor] = {}
        self.residual_dtype = residual_dtype
        self.allow_nonfinite = allow_nonfinite

    def compensate(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """x + e[key] in x's dtype (a new tensor; x is never modified)."""
        e = self._res.get(key)
        if e is None:
            return x
        if e.shape != x.shape:
            warnings.warn(
                f"ErrorFeedback: key {key!r} changed shape {tuple(e.shape)} -> {tuple(x.shape)}; "
                "its residual is reset",
                RuntimeWarning,
                stacklevel=2,
            )
            del self._res[key]
            return x
        if e.dtype == x.dtype:
            return x + e
        return (x.to(e.dtype) + e).to(x.dtype)

    def update(self, key: Hashable, corrected: torch.Tensor, decoded: torch.Tensor) -> None:
        """Remember what was not delivered: e[key] = corrected - decoded."""
        if corrected.shape != decoded.shape:
            raise ValueError(
                f"decoded: shape {tuple(decoded.shape)} differs from corrected {tuple(corrected.shape)}"
            )
        dtype = self.residual_dtype or corrected.dtype
        res = corrected.to(dtype) - decoded.to(dtype)
        if not self.allow_nonfinite:
            # One check covers a non-finite input and a decode that overflowed; the old
            # residual stays, so the key is as it was before this step.
            require_finite(res, f"ErrorFeedback: residual of key {key!r}")
        self._res[key] = res

    def residual(self, key: Hashable) -> torch.Tensor | None:
        return self._res.get(key)

    def reset(self, key: Hashable | None = None) -> None:
        """Forget one key's residual, or all of them."""
        if key is None:
            self._res.clear()
        else:
            self._res.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._res

    def __len__(self) -> int:
        return len(self._res)

    def keys(self) -> Iterator[Hashable]:
        return iter(list(self._res))

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.detach().clone() for k, v in self._res.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "residuals" not in state:
            raise ValueError("state: missing 'residuals'; expected the output of ErrorFeedback.state_dict()")
        res = state["residuals"]
        if not isinstance(res, Mapping) or not all(isinstance(v, torch.Tensor) for v in res.values()):
            raise ValueError("state: 'residuals' must map keys to tensors")
        if not self.allow_nonfinite:
            for k, v in res.items():
                require_finite(v, f"ErrorFeedback.load_state_dict: residual of key {k!r}")
        self._res = {k: v.detach().clone() for k, v in res.items()}
