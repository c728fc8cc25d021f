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
from ._pack import blocks, from_bytes, pack_nonneg, packed_nbytes, to_bytes, unpack_bits
from .base import Codec

__all__ = ["Sign", "pack_signs", "apply_signs"]


def pack_signs(flat: torch.Tensor) -> torch.Tensor:
    """Bit i of the result is 1 where flat[i] >= 0 (block-wise: no full-size temporary)."""
    out = torch.empty(packed_nbytes(flat.numel(), 1), dtype=torch.uint8, device=flat.device)
    for a, b in blocks(flat.numel(), 8):
        out[a // 8 : (b + 7) // 8] = pack_nonneg(flat[a:b])
    return out


def apply_signs(packed: torch.Tensor, a: int, out: torch.Tensor) -> torch.Tensor:
    """out[i] <- +1 / -1 from bits a .. a + out.numel() of `packed` (a multiple of 8)."""
    bits = unpack_bits(packed[a // 8 : (a + out.numel() + 7) // 8], 1, out.numel())
    return out.copy_(bits.view(out.shape)).mul_(2).sub_(1)


@register("sign")
class Sign(Codec):
    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        return torch.empty((), dtype=dtype).element_size() + packed_nbytes(shape.numel(), 1)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        flat = x.reshape(-1)
        scale = (torch.linalg.vector_norm(flat, ord=1, dtype=torch.float32) / flat.numel()).to(x.dtype)
        return torch.cat([to_bytes(scale.reshape(1)), pack_signs(flat)]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        size = torch.empty((), dtype=meta.dtype).element_size()
        # +-1 times a scale already rounded to the output dtype is exact in that dtype.
        scale = from_bytes(buffer, meta.dtype, 1)[0]
        packed = buffer[size:]
        out = torch.empty(meta.numel, dtype=meta.dtype, device=buffer.device)
        for a, b in blocks(meta.numel, 8):
            apply_signs(packed, a, out[a:b]).mul_(scale)
        return out
