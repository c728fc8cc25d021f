"""`lowrank`: rank-r approximation by seeded subspace iteration (PowerSGD-style, one shot).

For A = input viewed as (N, C), in fp32, r' = min(rank, N, C):
1. Q = orth(G), G a (C, r') Gaussian drawn from `torch.Generator().manual_seed(seed)` on
   the CPU, so the output depends only on the input (and is identical on every device type).
2. `iters` times: Q = orth(A^T (A Q)).
3. U = orth(A Q) (N, r'); V = U^T A (r', C).
4. Send U then V in the input dtype; decode U V.
Payload: r' (N + C) * itemsize bytes. Non-finite inputs: the factors are sent as NaN
(checked once per call, since a QR of non-finite data is meaningless).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..finite import all_finite
from ..payload import PayloadMeta
from ..registry import register
from ._pack import from_bytes, to_bytes
from ..validate import check_int
from .base import Codec, as_matrix, matrix_shape

__all__ = ["LowRank", "lowrank_factors"]


def _orth(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(m, mode="reduced").Q


def lowrank_factors(a: torch.Tensor, rank: int, seed: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U orthonormal (N, r') and V = U^T A (r', C), from a float32 matrix."""
    n, c = a.shape
    r = min(rank, n, c)
    if not all_finite(a):
        nan = float("nan")
        return a.new_full((n, r), nan), a.new_full((r, c), nan)
    g = torch.randn(c, r, generator=torch.Generator().manual_seed(seed)).to(a.device)
    q = _orth(g)
    for _ in range(iters):
        q = _orth(a.T @ (a @ q))
    u = _orth(a @ q)
    return u, u.T @ a


@register("lowrank")
class LowRank(Codec):
    def __init__(self, rank: int = 8, seed: int = 0, iters: int = 2) -> None:
        self.rank = check_int(f"{self.name}.rank", rank, 1)
        self.seed = check_int(f"{self.name}.seed", seed, 0)
        self.iters = check_int(f"{self.name}.iters", iters, 0, 64)

    def params(self) -> Mapping[str, Any]:
        return {"rank": self.rank, "seed": self.seed, "iters": self.iters}

    def _nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        n, c = matrix_shape(shape)
        return min(self.rank, n, c) * (n + c) * torch.empty((), dtype=dtype).element_size()

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Mapping[str, Any]]:
        u, v = lowrank_factors(as_matrix(x).float(), self.rank, self.seed, self.iters)
        return torch.cat([to_bytes(u.to(x.dtype)), to_bytes(v.to(x.dtype))]), {}

    def _decode(self, buffer: torch.Tensor, meta: PayloadMeta) -> torch.Tensor:
        n, c = matrix_shape(meta.shape)
        r = min(self.rank, n, c)
        uv = from_bytes(buffer, meta.dtype, r * (n + c)).float()
        return uv[: n * r].view(n, r) @ uv[n * r :].view(r, c)
