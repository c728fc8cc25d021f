"""Uncompressed and cast codecs: `identity`, `fp16`, `bf16`.

All three are additive: their buffers are plain numbers, so an all-reduce can sum them.
Non-finite values pass through unchanged; finite values beyond fp16's range (65504)
become +-inf in `fp16`, as a cast does.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..payload import PayloadMeta
from ..registry import register
from .base import Codec

__all__ = ["Identity", "Fp16", "Bf16"]


class _Cast(Codec):
    additive = True
    wire_dtype: torch.dtype | None = None  # None: keep the input dtype

    def _wire(self, dtype: torch.dtype) -> torch.dtype:
        return self.wire_dtype or dtype

    def empty_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self._wire(dtype)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        # Always a fresh buffer: an in-place all-reduce must never write into the caller's tensor.
        return x.reshape(-1).to(self._wire(x.dtype), copy=True).contiguous(), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        return buffer.to(meta.dtype)

    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        return shape.numel() * torch.empty((), dtype=self._wire(dtype)).element_size()


@register("identity")
class Identity(_Cast):
    """Send the tensor as it is (the uncompressed baseline)."""


@register("fp16")
class Fp16(_Cast):
    """Cast to IEEE half precision for the wire."""

    wire_dtype = torch.float16


@register("bf16")
class Bf16(_Cast):
    """Cast to bfloat16 for the wire (fp32's range, 8 bits of mantissa)."""

    wire_dtype = torch.bfloat16
