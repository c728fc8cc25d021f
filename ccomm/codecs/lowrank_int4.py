"""`lowrank_int4`: `lowrank` whose factors are further quantized to 4 bits.

1. U (N, r') and V (r', C) as in `lowrank`.
2. Each column of U and each row of V gets its own min and step = (max - min) / 15,
   rounded to the input dtype; codes = round((x - min) / step) in [0, 15] (step 0: all
   codes 0, decoding to min).
3. Payload: the 4 r' scale values (U mins, U steps, V mins, V steps) in the input dtype,
   then U's codes column by column and V's row by row, two per byte, each column/row
   padded to a whole byte: 4 r' itemsize + r' (ceil(N/2) + ceil(C/2)) bytes.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..payload import PayloadMeta
from ..registry import register
from ._pack import from_bytes, pack_bits, to_bytes, unpack_bits
from .base import as_matrix, matrix_shape
from .lowrank import LowRank, lowrank_factors

__all__ = ["LowRankInt4"]


def _quantize_rows(m: torch.Tensor, wire: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit codes (rows, ceil(cols/2)) packed per row, with per-row min and step (fp32, wire-rounded)."""
    lo, hi = m.aminmax(dim=1)
    lo = lo.to(wire).float()
    step = ((hi - lo) / 15).to(wire).float()
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    codes = ((m - lo[:, None]) * inv[:, None]).round_().clamp_(0, 15).to(torch.uint8)
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
    return pack_bits(codes, 4).view(m.shape[0], -1), lo, step


def _dequantize_rows(packed: torch.Tensor, rows: int, cols: int, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    width = (cols + 1) // 2
    codes = unpack_bits(packed, 4, rows * width * 2).view(rows, width * 2)[:, :cols]
    return codes.float() * step[:, None] + lo[:, None]


@register("lowrank_int4")
class LowRankInt4(LowRank):
    def __init__(self, rank: int = 32, seed: int = 0, iters: int = 2) -> None:
        super().__init__(rank=rank, seed=seed, iters=iters)

    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        n, c = matrix_shape(shape)
        r = min(self.rank, n, c)
        return 4 * r * torch.empty((), dtype=dtype).element_size() + r * ((n + 1) // 2 + (c + 1) // 2)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        u, v = lowrank_factors(as_matrix(x).float(), self.rank, self.seed, self.iters)
        pu, ulo, ustep = _quantize_rows(u.T.contiguous(), x.dtype)
        pv, vlo, vstep = _quantize_rows(v, x.dtype)
        scales = torch.cat([ulo, ustep, vlo, vstep]).to(x.dtype)
        return torch.cat([to_bytes(scales), pu.reshape(-1), pv.reshape(-1)]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n, c = matrix_shape(meta.shape)
        r = min(self.rank, n, c)
        size = torch.empty((), dtype=meta.dtype).element_size()
        ulo, ustep, vlo, vstep = from_bytes(buffer, meta.dtype, 4 * r).float().view(4, r)
        off = 4 * r * size
        nu = r * ((n + 1) // 2)
        ut = _dequantize_rows(buffer[off : off + nu], r, n, ulo, ustep)
        v = _dequantize_rows(buffer[off + nu :], r, c, vlo, vstep)
        return ut.T @ v
