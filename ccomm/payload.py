"""`Payload`: what a codec hands to the wire.

Only `buffer` crosses the network. Everything else a decoder needs (original shape and
dtype, seeds) lives in `meta`, which stays on the rank: receivers rebuild it from the
codec and the tensor they expect (`Codec.meta_for`), never from the sender.

`to_bytes` and `from_bytes` convert between a buffer and the raw bytes a transport moves,
for front-ends that send payloads as bytes (CompactFusion's ring sends uint8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

__all__ = ["Payload", "PayloadMeta", "to_bytes", "from_bytes"]


@dataclass(frozen=True)
class PayloadMeta:
    """Local context of a payload: never sent.

    `extra` holds codec-specific values that every rank can derive without
    communication (e.g. the per-call seed of random-k), so a rank can decode a payload
    it received using its own meta.
    """

    shape: torch.Size
    dtype: torch.dtype
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The codec that made (or will decode) the payload; None for raw tensors. Never sent:
    #: the transport's wire header (`ccomm.header`) carries a digest of its spec.
    codec: Any = field(default=None, compare=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


@dataclass(frozen=True)
class Payload:
    """A contiguous 1-D buffer plus local metadata.

    `buffer` is packed `uint8` for bit-packed codecs, or a numeric dtype for codecs whose
    payloads may be summed by an all-reduce. `nbytes` is exactly what the transport sends.
    """

    buffer: torch.Tensor
    meta: PayloadMeta

    def __post_init__(self) -> None:
        if self.buffer.dim() != 1:
            raise ValueError(f"buffer: must be 1-D, got shape {tuple(self.buffer.shape)}")
        if not self.buffer.is_contiguous():
            raise ValueError("buffer: must be contiguous")

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def with_buffer(self, buffer: torch.Tensor) -> "Payload":
        """The same local context around another buffer (e.g. one received or reduced)."""
        return Payload(buffer, self.meta)


def to_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes as a flat uint8 view (copying only if not contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(data: torch.Tensor, dtype: torch.dtype, count: int) -> torch.Tensor:
    """`count` values of `dtype` from the start of uint8 `data`; copies only when misaligned."""
    size = dtype.itemsize
    chunk = data[: count * size]
    if chunk.storage_offset() % size:
        chunk = chunk.clone()
    return chunk.view(dtype)
