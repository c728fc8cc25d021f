"""`qsgd`: QSGD stochastic quantization to `levels` magnitude levels per bucket.

1. Per bucket of `bucket` entries: norm = ||x||_2 (fp32, sent).
2. Each entry: l = floor(|x| / norm * levels + u), u ~ U[0, 1) seeded, so
   E[l / levels * norm] = |x| (unbiased).
3. Code = 2 l + (x < 0), packed in 1 + ceil(log2(levels + 1)) bits.
4. Decode: sign * l / levels * norm.
Non-finite inputs make their bucket's norm non-finite and that bucket decodes non-finite.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..payload import PayloadMeta
from ..registry import register
from ._pack import blocks, bucket_rows, from_bytes, pack_bits, packed_nbytes, to_bytes, unpack_bits
from ..validate import check_int
from .base import Codec, saturate_

__all__ = ["QSGD"]


@register("qsgd")
class QSGD(Codec):
    def __init__(self, levels: int = 16, bucket: int = 512, seed: int = 0) -> None:
        self.levels = check_int("qsgd.levels", levels, 1, 127)
        self.bucket = check_int("qsgd.bucket", bucket, 1)
        self.seed = check_int("qsgd.seed", seed, 0)
        self.bits = 1 + math.ceil(math.log2(self.levels + 1))
        self._gen = torch.Generator().manual_seed(self.seed)

    def params(self) -> Mapping[str, Any]:
        return {"levels": self.levels, "bucket": self.bucket, "seed": self.seed}

    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        n = shape.numel()
        return 4 * -(-n // self.bucket) + packed_nbytes(n, self.bits)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        flat = x.reshape(-1)
        n = flat.numel()
        norms = torch.empty(-(-n // self.bucket), dtype=torch.float32, device=x.device)
        packed = torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8, device=x.device)
        for a, b in blocks(n, 8 * self.bucket):
            i, codes = a // self.bucket, []
            for rows in bucket_rows(flat[a:b].float(), self.bucket):
                norm = torch.linalg.vector_norm(rows, dim=1)
                norms[i : i + len(norm)] = norm
                i += len(norm)
                inv = torch.where(norm > 0, self.levels / norm, torch.zeros_like(norm))
                u = torch.rand(rows.shape, generator=self._gen).to(rows.device)
                lvl = rows.abs().mul_(inv[:, None]).add_(u).floor_().clamp_(max=self.levels)
                codes.append((lvl.to(torch.uint8) * 2 + (rows < 0).to(torch.uint8)).reshape(-1))
            block = codes[0] if len(codes) == 1 else torch.cat(codes)
            packed[a * self.bits // 8 : packed_nbytes(b, self.bits)] = pack_bits(block, self.bits)
        return torch.cat([to_bytes(norms), packed]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n = meta.numel
        nb = -(-n // self.bucket)
        norms = from_bytes(buffer, torch.float32, nb)
        packed = buffer[4 * nb :]
        out = torch.empty(n, dtype=torch.float32, device=buffer.device)
        for a, b in blocks(n, 8 * self.bucket):
            codes = unpack_bits(packed[a * self.bits // 8 : packed_nbytes(b, self.bits)], self.bits, b - a)
            o = out[a:b].copy_(codes >> 1)
            o.mul_(torch.empty_like(o).copy_(codes & 1).mul_(-2).add_(1))  # sign bit 1 -> -1
            i = a // self.bucket
            for rows in bucket_rows(o, self.bucket):
                rows.mul_(norms[i : i + rows.shape[0], None] / self.levels)
                i += rows.shape[0]
        return saturate_(out, meta.dtype)
