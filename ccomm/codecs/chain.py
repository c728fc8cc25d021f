"""Chains of codecs, written `a|b|c` in specs (e.g. CocktailSGD's
`randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4`).

Every stage but the last must be a sparsifier: it selects entries of what it receives,
and the next stage compresses only the selected values. The payload is:
1. a header of one int32 per variable-size stage holding its k (absent when every k
   follows from the shapes);
2. the last stage's payload;
3. the positions each index-sending stage must transmit (seeded random-k sends none).
A chain of index-free sparsifiers ending in an additive codec is itself additive; its
buffer is then the last stage's buffer, numbers that an all-reduce may sum.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..payload import Payload, PayloadMeta
from ._pack import from_bytes, index_width, pack_uint, split_bytes, to_bytes, unpack_uint
from ._sparse import Sparsifier
from .base import Codec

__all__ = ["Chain"]


class Chain(Codec):
    name = "chain"

    def __init__(self, stages: Sequence[Codec]) -> None:
        if len(stages) < 2:
            raise ValueError("chain: needs at least two stages joined by '|'")
        for st in stages[:-1]:
            if not isinstance(st, Sparsifier):
                raise ValueError(
                    f"chain: stage {st.spec!r} cannot be followed by another stage; "
                    "only sparsifiers (topk, approx_topk, randomk) may come before the last stage"
                )
        self.stages = list(stages)
        self.sparsifiers: list[Sparsifier] = list(stages[:-1])  # type: ignore[arg-type]
        self.last = stages[-1]
        self.additive = all(not s.sends_indices for s in self.sparsifiers) and self.last.additive  # type: ignore[misc]
        self.fixed_size = self.last.fixed_size  # type: ignore[misc]

    @property
    def spec(self) -> str:
        return "|".join(s.spec for s in self.stages)

    def _extra_for_receiver(self) -> Mapping[str, Any]:
        return {"stages": [s.meta_for((1,), torch.float32).extra for s in self.stages]}

    def _sizes(self, n: int) -> list[int]:
        """Input size of every stage, then the last stage's input size."""
        sizes = [n]
        for s in self.sparsifiers:
            sizes.append(s.k_for(sizes[-1]))
        return sizes

    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        sizes = self._sizes(shape.numel())
        idx = sum(s.index_nbytes(sizes[i], sizes[i + 1]) for i, s in enumerate(self.sparsifiers))
        return idx + self.last.nbytes((sizes[-1],), dtype)

    def empty_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.last.empty_dtype(dtype) if self.additive else torch.uint8

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        cur = x.reshape(-1)
        index_parts, extras = [], []
        for s in self.sparsifiers:
            values, idx, extra = s.select(cur)
            if s.sends_indices:
                assert idx is not None
                index_parts.append(pack_uint(idx, index_width(cur.numel())))
            extras.append(extra)
            cur = values
        last = self.last.encode(cur)
        extras.append(last.meta.extra)
        meta_extra = {"stages": extras}
        if self.additive:
            return last.buffer, meta_extra
        return torch.cat([to_bytes(last.buffer), *index_parts]), meta_extra

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        extras = meta.extra["stages"]
        sizes = self._sizes(meta.numel)
        if self.additive:
            body, index_parts = buffer, [None] * len(self.sparsifiers)
        else:
            idx_sizes = [s.index_nbytes(sizes[i], sizes[i + 1]) for i, s in enumerate(self.sparsifiers)]
            body_size = buffer.numel() - sum(idx_sizes)
            if body_size < 0:
                raise ValueError(f"chain: a payload of {buffer.numel()} bytes is too short for n={meta.numel}")
            body, *index_parts = split_bytes(buffer, [body_size, *idx_sizes])
            wire = self.last.empty_dtype(meta.dtype)
            if wire != torch.uint8:  # a numeric last stage (e.g. `|fp16`): reinterpret its bytes
                body = from_bytes(body, wire, body_size // torch.empty((), dtype=wire).element_size())
        cur = self.last.decode(Payload(body, PayloadMeta(torch.Size([sizes[-1]]), meta.dtype, extras[-1])))
        for i in reversed(range(len(self.sparsifiers))):
            s, n, k = self.sparsifiers[i], sizes[i], sizes[i + 1]
            if s.sends_indices:
                idx = unpack_uint(index_parts[i], index_width(n), k)
            else:
                idx = s.positions(n, k, extras[i], buffer.device)
            cur = s.scatter(cur, idx, n)
        return cur
