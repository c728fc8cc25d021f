"""`int2`: CompactFusion's 2-bit activation codec.

1. Scales u (per token), v (per channel) as in `binary`; s_nc = u_n v_c.
2. Two bits per entry: bit 0 = sign (r >= 0), bit 1 = large (|r| > s_nc).
3. Decode: +-0.5 s_nc for small entries, +-2 s_nc for large ones.
Payload: (N + C) * itemsize + ceil(N C / 4) bytes. Not additive.
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
    row_blocks,
    scales_nbytes,
    stack_fits,
    stack_outer,
    stack_scales,
    token_channel_scales,
    unpack_scales,
    unpack_stack,
)
from ._pack import byte_lookup, interleave_bits, pack_greater, pack_nonneg, packed_nbytes
from .base import Codec, as_matrix, matrix_shape

__all__ = ["Int2"]

SMALL, LARGE = 0.5, 2.0
#: Byte -> the signed levels of its four 2-bit codes (bit 0 sign, bit 1 large), LSB first.
_LEVELS = torch.tensor(
    [[(LARGE if (b >> (2 * i + 1)) & 1 else SMALL) * (1.0 if (b >> (2 * i)) & 1 else -1.0) for i in range(4)]
     for b in range(256)]
)


@register("int2")
class Int2(Codec):
    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        n, c = matrix_shape(shape)
        return scales_nbytes(n, c, dtype) + packed_nbytes(n * c, 2)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        a = as_matrix(x)
        n, c = a.shape
        u, v = token_channel_scales(a, x.dtype)
        codes = torch.empty(packed_nbytes(n * c, 2), dtype=torch.uint8, device=x.device)
        for r0, r1 in row_blocks(n, c):
            blk = a[r0:r1].float()
            large = pack_greater(blk.abs(), torch.outer(u[r0:r1], v))
            # A 2-bit code is (sign, large) in consecutive bits, LSB first: the two packed
            # bit planes interleaved.
            codes[r0 * c // 4 : (r1 * c + 3) // 4] = interleave_bits(pack_nonneg(blk), large, (r1 - r0) * c)
        return torch.cat([pack_scales(u, v, x.dtype), codes]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n, c = matrix_shape(meta.shape)
        u, v = unpack_scales(buffer, n, c, meta.dtype)
        codes = buffer[scales_nbytes(n, c, meta.dtype) :]
        out = torch.empty(n, c, dtype=meta.dtype, device=buffer.device)
        for r0, r1, o in fp32_row_blocks(out, needs_saturation(u, v, LARGE, meta.dtype)):
            level = byte_lookup(codes[r0 * c // 4 : (r1 * c + 3) // 4], _LEVELS, (r1 - r0) * c)
            # The levels are powers of two, so level * (u v) is exact scaling of one rounding.
            torch.outer(u[r0:r1], v, out=o).mul_(level.view(r1 - r0, c))
        return out

    # -- stacks (ccomm.codecs.stacked) --------------------------------------------------
    def encode_stack(self, x: torch.Tensor) -> torch.Tensor | None:
        """Payload bytes of the (T, N, C) stack `x` in one pass, or None if it does not fit."""
        t, (n, c) = x.shape[0], matrix_shape(x.shape[1:])
        if not stack_fits(t, n, c, 2):
            return None
        af, mag, uvw, u, v = stack_scales(x.reshape(t, n, c), x.dtype)
        large = pack_greater(mag, u.unsqueeze(2) * v.unsqueeze(1))
        return pack_stack(uvw, interleave_bits(pack_nonneg(af), large, t * n * c))

    def decode_stack(self, buffer: torch.Tensor, t: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        n, c = matrix_shape(shape)
        if not stack_fits(t, n, c, 2):
            return None
        u, v, codes = unpack_stack(buffer, t, n, c, dtype)
        return stack_outer(u, v, byte_lookup(codes, _LEVELS, t * n * c), LARGE, dtype)
