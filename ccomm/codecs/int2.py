"""`int2`: CompactFusion's 2-bit activation codec.

1. Scales u (per token), v (per channel) as in `binary`; s_nc = u_n v_c.
2. Two bits per entry: bit 0 = sign (r >= 0), bit 1 = large (|r| > s_nc).
3. Decode: +-0.5 s_nc for small entries, +-2 s_nc for large ones.
Payload: (N + C) * itemsize + ceil(N C / 4) bytes. Not additive.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..payload import PayloadMeta
from ..registry import register
from ._activation import pack_scales, scales_nbytes, token_channel_scales, unpack_scales
from ._pack import pack_bits, packed_nbytes, unpack_bits
from .base import Codec, as_matrix, matrix_shape

__all__ = ["Int2"]

#: Decoded multiple of s for each 2-bit code (bit 0: sign, bit 1: large).
_LEVELS = (-0.5, 0.5, -2.0, 2.0)


@register("int2")
class Int2(Codec):
    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        n, c = matrix_shape(shape)
        return scales_nbytes(n, c, dtype) + packed_nbytes(n * c, 2)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        a = as_matrix(x).float()
        u, v = token_channel_scales(a, x.dtype)
        large = a.abs() > torch.outer(u, v)
        codes = (a >= 0).to(torch.uint8) | (large.to(torch.uint8) << 1)
        return torch.cat([pack_scales(u, v, x.dtype), pack_bits(codes, 2)]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n, c = matrix_shape(meta.shape)
        u, v = unpack_scales(buffer, n, c, meta.dtype)
        codes = unpack_bits(buffer[scales_nbytes(n, c, meta.dtype) :], 2, n * c).view(n, c)
        table = torch.tensor(_LEVELS, dtype=torch.float32, device=buffer.device)
        return table[codes.int()] * torch.outer(u, v)
