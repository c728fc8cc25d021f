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
from ._pack import from_bytes, pack_bits, packed_nbytes, to_bytes, unpack_bits
from .base import Codec, check_int

__all__ = ["QSGD"]


@register("qsgd")
class QSGD(Codec):
    def __init__(self, levels: int = 16, bucket: int = 512, seed: int = 0) -> None:
        self.levels = check_int("qsgd", "levels", levels, 1, 127)
        self.bucket = check_int("qsgd", "bucket", bucket, 1)
        self.seed = check_int("qsgd", "seed", seed, 0)
        self.bits = 1 + math.ceil(math.log2(self.levels + 1))
        self._gen = torch.Generator().manual_seed(self.seed)

    def params(self) -> Mapping[str, Any]:
        return {"levels": self.levels, "bucket": self.bucket, "seed": self.seed}

    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        n = shape.numel()
        return 4 * -(-n // self.bucket) + packed_nbytes(n, self.bits)

    def _buckets(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full buckets as a matrix, and the short tail (possibly empty)."""
        full = flat.numel() - flat.numel() % self.bucket
        return flat[:full].view(-1, self.bucket), flat[full:]

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        flat = x.reshape(-1).float()
        main, tail = self._buckets(flat)
        norms = [torch.linalg.vector_norm(main, dim=1)]
        if tail.numel():
            norms.append(torch.linalg.vector_norm(tail).reshape(1))
        norm = torch.cat(norms)
        per_elem = torch.repeat_interleave(norm, self.bucket)[: flat.numel()]
        inv = torch.where(per_elem > 0, self.levels / per_elem, torch.zeros_like(per_elem))
        u = torch.rand(flat.shape, generator=self._gen).to(flat.device)
        lvl = (flat.abs() * inv + u).floor_().clamp_(max=self.levels)
        codes = lvl.to(torch.uint8) * 2 + (flat < 0).to(torch.uint8)
        return torch.cat([to_bytes(norm), pack_bits(codes, self.bits)]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n = meta.numel
        nb = -(-n // self.bucket)
        norm = from_bytes(buffer, torch.float32, nb)
        codes = unpack_bits(buffer[4 * nb :], self.bits, n)
        mag = (codes >> 1).float() * (torch.repeat_interleave(norm, self.bucket)[:n] / self.levels)
        return torch.where((codes & 1).bool(), -mag, mag)
