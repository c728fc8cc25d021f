"""`Stacked`: T tensors of one shape, each encoded as its own tensor, in one payload.

CompactFusion sends a layer's K and V together: one payload, one decode, instead of one
per tensor. The per-tensor statistics (scales, subspaces) must stay per tensor, so this is
not the inner codec applied to the stack (binary would then share channel scales between K
and V). Algorithm, for an input of shape (T, *shape):

1. Slice t is encoded exactly as `inner.encode(x[t])`; the payload is the concatenation of
   the T inner payloads' bytes, so its size is T * inner.nbytes(shape): the inner formula
   with no header.
2. Decode splits the bytes at the known inner sizes, decodes each slice as a receiver would
   (`inner.wrap`), and returns the (T, *shape) stack.
3. Codecs with a fused path (`encode_stack(x)` / `decode_stack(buffer, T, shape, dtype)`,
   returning None when they do not apply: `binary`, `int2`) produce the same bytes and the
   same reconstruction in one pass over the stack; the loop of steps 1 and 2 is the fallback
   (and the reference the tests compare the fused paths with).
The inner codec must have fixed-size payloads (receivers preallocate) and no per-call
decoding context (random-k's draw seed: a receiver could only supply the seed of the last
of the T draws), else ValueError.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..payload import PayloadMeta
from ..registry import make_codec
from ._pack import from_bytes, to_bytes
from .base import Codec

__all__ = ["Stacked"]


class Stacked(Codec):
    """T tensors of one shape in one payload, each with its own codec statistics (see module docstring)."""

    name = "stacked"

    def __init__(self, inner: Codec | str) -> None:
        self.inner = make_codec(inner)
        if not self.inner.fixed_size:
            raise ValueError(f"inner: {self.inner.spec} has data-dependent payload sizes; stacked needs fixed sizes")
        if _has_context(self.inner.meta_for((1,), torch.float32).extra):
            raise ValueError(f"inner: {self.inner.spec} decodes with per-call context (a random draw's seed); "
                             "stacked needs codecs whose payload alone decodes")
        self._sizes: dict[tuple[torch.Size, torch.dtype], int] = {}  # nbytes is asked every exchange

    def params(self) -> Mapping[str, Any]:
        return {"inner": self.inner.spec}

    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        got = self._sizes.get((shape, dtype))
        if got is None:
            got = self._sizes[(shape, dtype)] = int(shape[0]) * self.inner.nbytes(shape[1:], dtype)
        return got

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        if x.dim() < 2:
            raise ValueError(f"stacked: expected a (T, ...) stack of tensors, got shape {tuple(x.shape)}")
        fused = getattr(self.inner, "encode_stack", None)
        buf = fused(x) if fused is not None else None
        if buf is None:
            buf = torch.cat([to_bytes(self.inner.encode(x[t]).buffer) for t in range(x.shape[0])])
        return buf, {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        t, shape, dtype = int(meta.shape[0]), meta.shape[1:], meta.dtype
        fused = getattr(self.inner, "decode_stack", None)
        out = fused(buffer, t, shape, dtype) if fused is not None else None
        if out is not None:
            return out
        size = self.inner.nbytes(shape, dtype)
        bdtype = self.inner.empty_dtype(dtype)
        width = bdtype.itemsize
        parts = []
        for i in range(t):
            piece = from_bytes(buffer[i * size:(i + 1) * size], bdtype, size // width)
            parts.append(self.inner.decode(self.inner.wrap(piece, shape, dtype)))
        return torch.stack(parts)


def _has_context(extra: Any) -> bool:
    """Whether receiver-side metadata carries a value (nested stage dicts/lists may be empty)."""
    if isinstance(extra, Mapping):
        return any(_has_context(v) for v in extra.values())
    if isinstance(extra, (list, tuple)):
        return any(_has_context(v) for v in extra)
    return True
