"""`binary`: CompactFusion's 1-bit activation codec.

1. View the input as (N tokens, C channels) and compute the rank-1 scales u (per token)
   and v (per channel) of `_activation`.
2. Send one sign bit per entry (r >= 0 -> 1) after the N + C scales.
3. Decode: sign * u_n * v_c.
Payload: (N + C) * itemsize + ceil(N C / 8) bytes. Not additive (per-rank scales).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..payload import PayloadMeta
from ..registry import register
from ._activation import (
    fp32_row_blocks,
    needs_saturation,
    pack_scales,
    scales_nbytes,
    token_channel_scales,
    unpack_scales,
)
from ._pack import byte_lookup, packed_nbytes
from .base import Codec, as_matrix, matrix_shape

__all__ = ["Binary"]

#: Byte -> its eight signs (bit set -> +1), LSB first: one gather decodes eight entries.
_SIGNS = torch.tensor([[1.0 if (b >> i) & 1 else -1.0 for i in range(8)] for b in range(256)])


@register("binary")
class Binary(Codec):
    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        n, c = matrix_shape(shape)
        return scales_nbytes(n, c, dtype) + packed_nbytes(n * c, 1)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        a = as_matrix(x)
        signs = torch.empty(packed_nbytes(a.numel(), 1), dtype=torch.uint8, device=x.device)
        u, v = token_channel_scales(a, x.dtype, signs)
        return torch.cat([pack_scales(u, v, x.dtype), signs]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n, c = matrix_shape(meta.shape)
        u, v = unpack_scales(buffer, n, c, meta.dtype)
        signs = buffer[scales_nbytes(n, c, meta.dtype) :]
        out = torch.empty(n, c, dtype=meta.dtype, device=buffer.device)
        for r0, r1, o in fp32_row_blocks(out, needs_saturation(u, v, 1.0, meta.dtype)):
            sign = byte_lookup(signs[r0 * c // 8 : (r1 * c + 7) // 8], _SIGNS, (r1 - r0) * c)
            torch.outer(u[r0:r1], v, out=o).mul_(sign.view(r1 - r0, c))
        return out
