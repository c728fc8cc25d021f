"""`sign`: scaled 1-bit compression (EF-signSGD).

1. scale = mean |x| (the L1 norm over n), computed in fp32, sent in the input dtype.
2. One bit per entry: 1 for x >= 0, 0 otherwise, packed eight to a byte.
3. Decode: +scale or -scale.
Non-finite inputs make the scale non-finite, so the whole decoded tensor is non-finite.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..payload import PayloadMeta
from ..registry import register
from ._pack import from_bytes, pack_bits, packed_nbytes, to_bytes, unpack_bits
from .base import Codec

__all__ = ["Sign", "signed_scale"]


def signed_scale(bits: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """+magnitude where bit is 1, -magnitude where it is 0 (broadcasting)."""
    return torch.where(bits.bool(), magnitude, -magnitude)


@register("sign")
class Sign(Codec):
    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        return torch.empty((), dtype=dtype).element_size() + packed_nbytes(shape.numel(), 1)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        flat = x.reshape(-1)
        scale = (torch.linalg.vector_norm(flat, ord=1, dtype=torch.float32) / flat.numel()).to(x.dtype)
        return torch.cat([to_bytes(scale.reshape(1)), pack_bits(flat >= 0, 1)]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        size = torch.empty((), dtype=meta.dtype).element_size()
        scale = from_bytes(buffer, meta.dtype, 1).float()
        bits = unpack_bits(buffer[size:], 1, meta.numel)
        return signed_scale(bits, scale)
