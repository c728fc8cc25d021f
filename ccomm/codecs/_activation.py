"""Rank-1 magnitude scales shared by the CompactFusion activation codecs (`binary`, `int2`).

For an (N tokens, C channels) residual r:
    v_c = mean_n |r_nc|                     (per channel)
    u_n = mean_c |r_nc| / mean_n mean_c |r| (per token, normalized to mean 1)
so u_n * v_c approximates |r_nc| with N + C numbers. Both vectors travel in the input
dtype; the sender codes against the rounded values the receiver will see.
"""
from __future__ import annotations

import torch

from ._pack import from_bytes, to_bytes

__all__ = ["token_channel_scales", "scales_nbytes", "pack_scales", "unpack_scales"]


def token_channel_scales(a: torch.Tensor, wire: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) for a float32 (N, C) matrix, rounded to the wire dtype and back to fp32."""
    mag = a.abs()
    v = mag.mean(dim=0)
    row = mag.mean(dim=1)
    # An all-zero residual would divide 0 by 0: clamp to the dtype's smallest normal.
    denom = row.mean().clamp_min(torch.finfo(wire).tiny)
    # Sync-free: a non-finite denominator (non-finite input) poisons every token scale, so
    # the decoded tensor is non-finite rather than silently zero.
    poison = torch.where(torch.isfinite(denom), 0.0, float("nan"))
    u = row / denom + poison
    return u.to(wire).float(), v.to(wire).float()


def scales_nbytes(n: int, c: int, wire: torch.dtype) -> int:
    return (n + c) * torch.empty((), dtype=wire).element_size()


def pack_scales(u: torch.Tensor, v: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    return to_bytes(torch.cat([u, v]).to(wire))


def unpack_scales(buffer: torch.Tensor, n: int, c: int, wire: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    uv = from_bytes(buffer, wire, n + c).float()
    return uv[:n], uv[n:]
