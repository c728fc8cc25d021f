"""`binary`: CompactFusion's 1-bit activation codec.

1. View the input as (N tokens, C channels) and compute the rank-1 scales u (per token)
   and v (per channel) of `_activation`.
2. Send one sign bit per entry (r >= 0 -> 1) after the N + C scales.
3. Decode: sign * u_n * v_c.
Payload: (N + C) * itemsize + ceil(N C / 8) bytes. Not additive (per-rank scales).
`encode_stack`/`decode_stack`: T matrices in one pass (see `_activation`), the bytes of T
single-matrix payloads.
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
    pack_stack,
    scales_nbytes,
    stack_fits,
    stack_outer,
    stack_scales,
    token_channel_scales,
    unpack_scales,
    unpack_stack,
)
from ._pack import byte_lookup, pack_nonneg, packed_nbytes
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

    # -- stacks (ccomm.codecs.stacked) --------------------------------------------------
    def encode_stack(self, x: torch.Tensor) -> torch.Tensor | None:
        """Payload bytes of the (T, N, C) stack `x` in one pass, or None if it does not fit."""
        t, (n, c) = x.shape[0], matrix_shape(x.shape[1:])
        if not stack_fits(t, n, c, 1):
            return None
        af, _, uvw, _, _ = stack_scales(x.reshape(t, n, c), x.dtype)
        return pack_stack(uvw, pack_nonneg(af))

    def decode_stack(self, buffer: torch.Tensor, t: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        n, c = matrix_shape(shape)
        if not stack_fits(t, n, c, 1):
            return None
        u, v, codes = unpack_stack(buffer, t, n, c, dtype)
        return stack_outer(u, v, byte_lookup(codes, _SIGNS, t * n * c), 1.0, dtype)
