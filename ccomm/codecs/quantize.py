"""`quantize`: uniform quantization to `bits` per entry, with one scale set per bucket.

Algorithm, per bucket of `bucket` consecutive entries (the last one may be shorter):
1. `scheme=minmax`: lo = min, step = (max - min) / (2^bits - 1); code = round((x - lo) / step).
   `scheme=absmax`: step = max|x| / L with L = 2^(bits-1) - 1; code = round(x / step) + L
   (symmetric around zero, so zero is exact; needs bits >= 2).
2. `stochastic=true` rounds up with probability equal to the fractional part, which makes
   the codec unbiased: E[decode(encode(x))] = x.
3. Codes are bit-packed; the scales travel in fp32 (8 bytes per bucket for minmax, 4 for
   absmax) ahead of the codes. A constant bucket has step 0 and decodes exactly to lo.
Non-finite inputs: a bucket holding NaN or +-inf gets a non-finite scale and decodes to
non-finite values throughout; other buckets are unaffected.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..payload import PayloadMeta
from ..registry import register
from ._pack import from_bytes, pack_bits, packed_nbytes, to_bytes, unpack_bits
from .base import Codec, check_bool, check_choice, check_int

__all__ = ["Quantize"]

#: Buckets processed per block: bounds the fp32 temporaries (and keeps them in cache).
BLOCK_ELEMS = 1 << 20
_TINY = torch.finfo(torch.float32).tiny


@register("quantize")
class Quantize(Codec):
    def __init__(self, bits: int = 8, stochastic: bool = False, bucket: int = 512, scheme: str = "minmax", seed: int = 0) -> None:
        self.bits = check_int("quantize", "bits", bits, 1, 8)
        self.stochastic = check_bool("quantize", "stochastic", stochastic)
        self.bucket = check_int("quantize", "bucket", bucket, 1)
        self.scheme = check_choice("quantize", "scheme", scheme, ("minmax", "absmax"))
        if self.scheme == "absmax" and self.bits < 2:
            raise ValueError("quantize: bits=1 is not supported with scheme=absmax; allowed: 2..8")
        self.seed = check_int("quantize", "seed", seed, 0)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.levels = (1 << self.bits) - 1 if self.scheme == "minmax" else (1 << (self.bits - 1)) - 1

    def params(self) -> Mapping[str, Any]:
        p: dict[str, Any] = {"bits": self.bits, "stochastic": self.stochastic, "bucket": self.bucket, "scheme": self.scheme}
        if self.stochastic:
            p["seed"] = self.seed
        return p

    @property
    def _nscales(self) -> int:
        return 2 if self.scheme == "minmax" else 1

    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        n = shape.numel()
        nb = -(-n // self.bucket)
        return 4 * self._nscales * nb + packed_nbytes(n, self.bits)

    def _blocks(self, n: int) -> list[tuple[int, int]]:
        """(start, stop) element ranges made of whole buckets, plus the short tail bucket."""
        per = max(1, BLOCK_ELEMS // self.bucket) * self.bucket
        full = n - n % self.bucket
        spans = [(s, min(s + per, full)) for s in range(0, full, per)]
        if full < n:
            spans.append((full, n))
        return spans

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        flat = x.reshape(-1)
        n = flat.numel()
        codes = torch.empty(n, dtype=torch.uint8, device=x.device)
        scales = []
        for a, b in self._blocks(n):
            blk = flat[a:b].float().view(-1, min(self.bucket, b - a))
            lo, hi = blk.aminmax(dim=1)
            if self.scheme == "minmax":
                step = (hi - lo) / self.levels
                # Shifting the origin by half a step turns truncation into round-to-nearest.
                origin = lo - (0.0 if self.stochastic else 0.5) * step
            else:
                step = torch.maximum(hi, -lo) / self.levels
                origin = -(self.levels + (0.0 if self.stochastic else 0.5)) * step
            # A zero (or subnormal) step means a constant bucket: every code is 0 and decodes to lo.
            inv = torch.where(step >= _TINY, 1.0 / step, torch.zeros_like(step))
            q = blk.sub(origin.unsqueeze(1)).mul_(inv.unsqueeze(1))
            if self.stochastic:
                noise = torch.rand(q.shape, generator=self._gen).to(q.device)
                q.add_(noise).clamp_(max=2 * self.levels if self.scheme == "absmax" else self.levels)
            codes[a:b].view_as(q).copy_(q)  # float -> uint8 truncates: floor for q >= 0
            scales.append(torch.stack([lo, step]) if self.scheme == "minmax" else step.unsqueeze(0))
        scale_t = torch.cat(scales, dim=1)  # (nscales, nbuckets)
        return torch.cat([to_bytes(scale_t), pack_bits(codes, self.bits)]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n = meta.numel
        nb = -(-n // self.bucket)
        ns = self._nscales
        expected = self._nbytes(meta.shape, meta.dtype)
        if buffer.numel() != expected:
            raise ValueError(f"quantize: payload has {buffer.numel()} bytes, expected {expected} for n={n}")
        scale_t = from_bytes(buffer, torch.float32, ns * nb).view(ns, nb)
        codes = unpack_bits(buffer[4 * ns * nb :], self.bits, n)
        out = torch.empty(n, dtype=torch.float32, device=buffer.device)
        for a, b in self._blocks(n):
            width = min(self.bucket, b - a)
            i0, i1 = a // self.bucket, -(-b // self.bucket)
            c = codes[a:b].view(-1, width)
            o = out[a:b].view(-1, width)
            step = scale_t[-1, i0:i1].unsqueeze(1)
            torch.mul(c, step, out=o)
            if self.scheme == "minmax":
                o.add_(scale_t[0, i0:i1].unsqueeze(1))
            else:
                o.sub_(self.levels * step)
        return out
