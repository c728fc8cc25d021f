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
from ._pack import BLOCK_ELEMS, blocks, bucket_rows, from_bytes, pack_bits, packed_nbytes, to_bytes, unpack_bits
from ..validate import check_bool, check_choice, check_int
from .base import Codec

__all__ = ["Quantize"]

_TINY = torch.finfo(torch.float32).tiny


@register("quantize")
class Quantize(Codec):
    def __init__(self, bits: int = 8, stochastic: bool = False, bucket: int = 512, scheme: str = "minmax", seed: int = 0) -> None:
        self.bits = check_int("quantize.bits", bits, 1, 8)
        self.stochastic = check_bool("quantize.stochastic", stochastic)
        self.bucket = check_int("quantize.bucket", bucket, 1)
        self.scheme = check_choice("quantize.scheme", scheme, ("minmax", "absmax"))
        if self.scheme == "absmax" and self.bits < 2:
            raise ValueError("quantize: bits=1 is not supported with scheme=absmax; allowed: 2..8")
        self.seed = check_int("quantize.seed", seed, 0)
        self._gen = torch.Generator().manual_seed(self.seed)
        #: Largest code minus the zero offset: 2^bits - 1 (minmax) or 2^(bits-1) - 1 (absmax).
        self.levels = (1 << self.bits) - 1 if self.scheme == "minmax" else (1 << (self.bits - 1)) - 1
        self._max_code = self.levels if self.scheme == "minmax" else 2 * self.levels

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
        return 4 * self._nscales * -(-n // self.bucket) + packed_nbytes(n, self.bits)

    def _spans(self, n: int) -> list[tuple[int, int]]:
        # Blocks of whole multiples of 8 buckets: each block's packed codes start on a byte.
        # Four times the default block: quantize runs ~10 ops per block, and on the project
        # machine 2^20-element blocks (still cache-resident) cut its time by ~20 % at 16M-64M.
        return list(blocks(n, 8 * self.bucket, 4 * BLOCK_ELEMS))

    def _code_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (uint8) and (lo, step) for a matrix with one bucket per row."""
        lo, hi = rows.aminmax(dim=1)
        if self.scheme == "minmax":
            step = (hi - lo) / self.levels
            origin = lo
        else:
            step = torch.maximum(hi, -lo) / self.levels
            origin = -self.levels * step
        # A zero (or subnormal) step means a constant bucket: every code is 0, decoding to lo.
        inv = torch.where(step >= _TINY, 1.0 / step, torch.zeros_like(step))
        q = rows.sub(origin[:, None]).mul_(inv[:, None])
        if self.stochastic:
            q.add_(torch.rand(q.shape, generator=self._gen).to(q.device)).clamp_(max=self._max_code)
        else:
            q.add_(0.5)  # float -> uint8 truncates, so +0.5 rounds to nearest for q >= 0
        return q.to(torch.uint8), lo, step

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        flat = x.reshape(-1)
        n = flat.numel()
        nb = -(-n // self.bucket)
        scales = torch.empty(2, nb, dtype=torch.float32, device=x.device)
        packed = torch.empty(packed_nbytes(n, self.bits), dtype=torch.uint8, device=x.device)
        for a, b in self._spans(n):
            i = a // self.bucket
            codes = []
            for rows in bucket_rows(flat[a:b].float(), self.bucket):
                c, lo, step = self._code_rows(rows)
                scales[0, i : i + len(lo)] = lo
                scales[1, i : i + len(lo)] = step
                codes.append(c.reshape(-1))
                i += len(lo)
            block = codes[0] if len(codes) == 1 else torch.cat(codes)
            packed[a * self.bits // 8 : packed_nbytes(b, self.bits)] = pack_bits(block, self.bits)
        head = scales if self.scheme == "minmax" else scales[1]
        return torch.cat([to_bytes(head), packed]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n = meta.numel
        nb = -(-n // self.bucket)
        ns = self._nscales
        scales = from_bytes(buffer, torch.float32, ns * nb).view(ns, nb)
        packed = buffer[4 * ns * nb :]
        out = torch.empty(n, dtype=meta.dtype, device=buffer.device)
        direct = meta.dtype == torch.float32
        for a, b in self._spans(n):
            codes = unpack_bits(packed[a * self.bits // 8 : packed_nbytes(b, self.bits)], self.bits, b - a)
            o = out[a:b] if direct else torch.empty(b - a, device=buffer.device)
            o.copy_(codes)
            i = a // self.bucket
            for rows in bucket_rows(o, self.bucket):
                step = scales[-1, i : i + rows.shape[0], None]
                rows.mul_(step)
                if self.scheme == "minmax":
                    rows.add_(scales[0, i : i + rows.shape[0], None])
                else:
                    rows.sub_(self.levels * step)
                i += rows.shape[0]
            if not direct:
                out[a:b] = o
        return out
