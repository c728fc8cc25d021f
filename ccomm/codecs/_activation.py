"""Rank-1 magnitude scales shared by the CompactFusion activation codecs (`binary`, `int2`).

For an (N tokens, C channels) residual r:
    v_c = mean_n |r_nc|                     (per channel)
    u_n = mean_c |r_nc| / mean_n mean_c |r| (per token, normalized to mean 1)
so u_n * v_c approximates |r_nc| with N + C numbers. Both vectors travel in the input
dtype; the sender codes against the rounded values the receiver will see. Work is done
in blocks of whole rows (a multiple of 8, so packed bits of a block start on a byte).

Stacks (`ccomm.codecs.stacked`): T matrices of one shape, each with its own scales, coded in
one pass over the (T, N, C) tensor when the stack is small (`stack_fits`): the layout is the
concatenation of the T single-matrix payloads, byte for byte, so a stack costs the per-call
work of one matrix instead of T.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ._pack import BLOCK_ELEMS, blocks, from_bytes, pack_nonneg, to_bytes
from .base import saturate_

__all__ = [
    "row_blocks",
    "fp32_row_blocks",
    "needs_saturation",
    "needs_saturation_torch",
    "token_channel_scales",
    "scales_nbytes",
    "pack_scales",
    "unpack_scales",
    "STACK_ELEMS",
    "stack_fits",
    "stack_scales",
    "pack_stack",
    "unpack_stack",
    "stack_outer",
]

#: Largest stack (elements) coded in one pass; bigger ones go matrix by matrix, in blocks.
STACK_ELEMS = 1 << 19


def row_blocks(n: int, c: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about BLOCK_ELEMS entries, each starting on a multiple of 8 rows."""
    return blocks(n, 8, max(8, BLOCK_ELEMS // max(c, 1)))


def fp32_row_blocks(out: torch.Tensor, saturate: bool = True) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (r0, r1, o): an fp32 block for rows r0:r1 of the (N, C) output `out`.

    For an fp32 `out`, o is a view into it; otherwise o is a scratch block that is
    saturated (unless `saturate` is False) and cast into `out` when the loop moves on
    (math in fp32, one rounding).
    """
    n, c = out.shape
    direct = out.dtype == torch.float32
    for r0, r1 in row_blocks(n, c):
        o = out[r0:r1] if direct else torch.empty(r1 - r0, c, device=out.device)
        yield r0, r1, o
        if not direct:
            out[r0:r1].copy_(saturate_(o, out.dtype) if saturate else o)


def needs_saturation(u: torch.Tensor, v: torch.Tensor, level: float, dtype: torch.dtype) -> bool:
    """Whether some decoded magnitude `level * u_n * v_c` (fp32) may exceed `dtype`'s range.

    fp32 rounding is monotonic, so the largest product is exactly fl(max u * max v); `level`
    is a power of two (exact). NaN scales answer True, and the clamp then keeps the NaN.
    """
    if dtype == torch.float32 or u.numel() == 0 or v.numel() == 0:
        return False
    if u.device.type != "cpu":
        return needs_saturation_torch(u, v, level, dtype)
    # Cheaper than four torch ops: the float64 product of two fp32 values is exact, and fl32
    # rounds it up by at most a factor (1 + 2**-24); NaN compares False (saturate). Near the
    # limit this may answer True where torch would not: the clamp is then a no-op.
    top = float(u.numpy().max()) * float(v.numpy().max()) * level * (1.0 + 2.0**-23)
    return not top <= torch.finfo(dtype).max


def needs_saturation_torch(u: torch.Tensor, v: torch.Tensor, level: float, dtype: torch.dtype) -> bool:
    """`needs_saturation` in torch ops on any device (exact: the fp32 product itself)."""
    if dtype == torch.float32 or u.numel() == 0 or v.numel() == 0:
        return False
    top = u.amax() * v.amax() * level
    return not bool(top <= torch.finfo(dtype).max)


def token_channel_scales(
    a: torch.Tensor, wire: torch.dtype, signs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) of an (N, C) matrix, rounded to the wire dtype and returned as fp32.

    If `signs` (uint8, ceil(N C / 8) bytes) is given, the sign bits are packed into it in
    the same pass over the data.
    """
    n, c = a.shape
    colsum = torch.zeros(c, dtype=torch.float32, device=a.device)
    row = torch.empty(n, dtype=torch.float32, device=a.device)
    for r0, r1 in row_blocks(n, c):
        blk = a[r0:r1].float()
        mag = blk.abs()
        colsum += mag.sum(dim=0)
        torch.mean(mag, dim=1, out=row[r0:r1])
        if signs is not None:
            signs[r0 * c // 8 : (r1 * c + 7) // 8] = pack_nonneg(blk)
    v = colsum / n
    # An all-zero residual would divide 0 by 0: clamp to the dtype's smallest normal.
    denom = row.mean().clamp_min(torch.finfo(wire).tiny)
    # Sync-free: a non-finite denominator (non-finite input) poisons every token scale, so
    # the decoded tensor is non-finite rather than silently zero.
    poison = torch.where(torch.isfinite(denom), 0.0, float("nan"))
    u = row / denom + poison
    return u.to(wire).float(), v.to(wire).float()


def scales_nbytes(n: int, c: int, wire: torch.dtype) -> int:
    return (n + c) * wire.itemsize


def pack_scales(u: torch.Tensor, v: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
    return to_bytes(torch.cat([u, v]).to(wire))


def unpack_scales(buffer: torch.Tensor, n: int, c: int, wire: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    uv = from_bytes(buffer, wire, n + c).float()
    return uv[:n], uv[n:]


# -- stacks of T matrices in one pass ----------------------------------------------------------
def stack_fits(t: int, n: int, c: int, bits: int) -> bool:
    """Whether a (t, n, c) stack can be coded in one pass: each matrix's codes fill whole
    bytes (so the T payloads concatenate without re-packing) and the stack is small."""
    return t * n * c <= STACK_ELEMS and (n * c * bits) % 8 == 0 and n > 0 and c > 0


def stack_scales(a: torch.Tensor, wire: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_channel_scales` of every matrix of a (T, N, C) stack, in one pass.

    Returns (a in fp32, |a| in fp32, the scales [u_t, v_t] per row in `wire` (T, N + C),
    u (T, N) and v (T, C) as the fp32 values of those rounded scales).
    """
    n = a.shape[1]
    af = a.float()
    mag = af.abs()
    row = mag.mean(dim=2)
    denom = row.mean(dim=1, keepdim=True).clamp_min(torch.finfo(wire).tiny)
    poison = torch.where(torch.isfinite(denom), 0.0, float("nan"))
    uvw = torch.cat([row / denom + poison, mag.sum(dim=1) / n], dim=1).to(wire)
    uv = uvw.float()
    return af, mag, uvw, uv[:, :n], uv[:, n:]


def pack_stack(uvw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """One payload: per matrix t, its scales (row t of `uvw`, in the wire dtype) then its code bytes."""
    t = uvw.shape[0]
    return torch.cat([uvw.view(torch.uint8), codes.view(t, -1)], dim=1).reshape(-1)


def unpack_stack(buffer: torch.Tensor, t: int, n: int, c: int, wire: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_stack`: u (T, N) and v (T, C) as fp32, and the code bytes (T, k)."""
    rows = buffer.view(t, -1)
    s = scales_nbytes(n, c, wire)
    uv = rows[:, :s].contiguous().view(wire).float()  # the copy also aligns the scales
    return uv[:, :n], uv[:, n:], rows[:, s:]


def stack_outer(u: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, level: float, dtype: torch.dtype) -> torch.Tensor:
    """(u_tn v_tc) * levels in fp32, saturated to and cast into `dtype`: the decoded (T, N, C) stack.

    Same op order and rounding as the single-matrix decoders (outer product, then the level).
    """
    out = (u.unsqueeze(2) * v.unsqueeze(1)).mul_(levels.view(u.shape[0], u.shape[1], v.shape[1]))
    if needs_saturation(u, v, level, dtype):
        saturate_(out, dtype)
    return out.to(dtype)
