"""The `Codec` interface (codec keyword checks are `ccomm.validate`'s)."""
from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..payload import Payload, PayloadMeta

__all__ = [
    "Codec",
    "FLOAT_DTYPES",
    "as_matrix",
    "matrix_shape",
    "saturate_",
]

#: Input dtypes every codec accepts.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """View `x` as (N, C): C is the last dimension, N everything before it (0-d/1-D: N = 1).

    Activations arrive as (tokens, channels) or (B, S, H*D); the per-row / per-column
    statistics of the activation codecs follow that convention.
    """
    if x.dim() <= 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def saturate_(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp a float32 result into `dtype`'s finite range before the cast (NaN stays NaN).

    Codecs whose decoded magnitudes can exceed max|x| (rank-1 scales, +-2s levels, QSGD's
    norm-sized levels) would otherwise turn finite fp16 inputs near 65504 into inf.
    """
    if dtype == torch.float32:
        return t
    info = torch.finfo(dtype)
    return t.clamp_(info.min, info.max)


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    numel = math.prod(shape)
    if len(shape) <= 1:
        return 1, numel
    c = int(shape[-1])
    return (numel // c if c else 0), c


class Codec(abc.ABC):
    """Encode a tensor into a `Payload` and back.

    Subclasses implement `_encode(x)` on a tensor with at least one element and
    `_decode(buffer, meta)` returning a tensor of `meta.numel` elements (any shape); the
    base class handles empty tensors, dtype checks, the buffer's length against
    `nbytes(shape, dtype)` and restoring shape and dtype.
    """

    name: ClassVar[str] = "?"
    #: True when decode(sum of payload buffers) == sum of decodes, so all-reduce is legal.
    additive: ClassVar[bool] = False
    #: True when the payload size depends only on the input shape and dtype.
    fixed_size: ClassVar[bool] = True

    # -- public API -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Payload:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.name}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{self.name}: dtype {x.dtype} is not supported; allowed: float32, float16, bfloat16"
            )
        if x.numel() == 0:
            return Payload(torch.empty(0, dtype=self.empty_dtype(x.dtype), device=x.device), self.meta_for(x.shape, x.dtype))
        buffer, extra = self._encode(x)
        return Payload(buffer, PayloadMeta(x.shape, x.dtype, extra, self))

    def decode(self, payload: Payload) -> torch.Tensor:
        """The tensor `payload` encodes; a buffer that cannot be one is a `ValueError`.

        A received buffer is decoded with the receiver's own shape, so a buffer whose
        dtype or byte length disagrees with that shape (truncated, extended, or encoded
        for another shape or codec) is refused here, before any codec reads it.
        """
        meta = payload.meta
        self.check_buffer(payload.buffer, meta)
        if meta.numel == 0:
            return torch.zeros(meta.shape, dtype=meta.dtype, device=payload.buffer.device)
        out = self._decode(payload.buffer, meta)
        return out.reshape(meta.shape).to(meta.dtype)

    def check_buffer(self, buffer: torch.Tensor, meta: PayloadMeta) -> None:
        """Raise `ValueError` unless `buffer` has the dtype and length of a payload for `meta`."""
        want = self.empty_dtype(meta.dtype)
        if buffer.dtype != want:
            raise ValueError(
                f"{self.spec}: payload buffer has dtype {buffer.dtype}, expected {want} for a "
                f"{meta.dtype} tensor of shape {tuple(meta.shape)}"
            )
        got = buffer.numel() * buffer.element_size()
        expected = self.nbytes(meta.shape, meta.dtype)
        if got != expected if self.fixed_size else got > expected:
            rel = "exactly" if self.fixed_size else "at most"
            raise ValueError(
                f"{self.spec}: payload has {got} bytes, expected {rel} {expected} for a {meta.dtype} "
                f"tensor of shape {tuple(meta.shape)} (truncated, extended, or encoded for another "
                "shape or codec)"
            )

    def meta_for(self, shape: Sequence[int], dtype: torch.dtype) -> PayloadMeta:
        """The local context a receiver uses to decode a buffer for a tensor of this shape."""
        return PayloadMeta(torch.Size(shape), dtype, self._extra_for_receiver(), self)

    def wrap(self, buffer: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> Payload:
        """A received `buffer` as a payload this rank can decode."""
        return Payload(buffer, self.meta_for(shape, dtype))

    def nbytes(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
        """Exact payload size for fixed-size codecs; an upper bound otherwise."""
        if math.prod(shape) == 0:
            return 0
        return self._nbytes(torch.Size(shape), dtype)

    def bound_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Payload size bound for a 1-D tensor of `numel` elements."""
        return self.nbytes((numel,), dtype)

    def empty_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Buffer dtype of this codec's payloads (numeric for additive codecs)."""
        return dtype if self.additive else torch.uint8

    @property
    def spec(self) -> str:
        params = self.params()
        if not params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in params.items())

    def params(self) -> Mapping[str, Any]:
        """Constructor parameters (for `spec` and logging)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    # -- for subclasses ---------------------------------------------------------------
    def _extra_for_receiver(self) -> Mapping[str, Any]:
        return {}

    @abc.abstractmethod
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        ...

    @abc.abstractmethod
    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        ...


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
