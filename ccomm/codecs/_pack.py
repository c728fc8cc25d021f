"""Byte-level packing shared by the codecs: bit codes, integer indices, float pieces.

Everything here is device-agnostic tensor arithmetic (no numpy round trips), so the same
code packs on CPU and GPU. Multi-byte values are stored little-endian, as every platform
torch runs on is.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from ..payload import from_bytes, to_bytes  # public there; re-exported for the codecs

__all__ = [
    "BLOCK_ELEMS",
    "blocks",
    "pack_bits",
    "pack_nonneg",
    "pack_greater",
    "interleave_bits",
    "interleave_bits_torch",
    "byte_lookup",
    "byte_lookup_torch",
    "unpack_bits",
    "packed_nbytes",
    "index_width",
    "pack_uint",
    "unpack_uint",
    "to_bytes",
    "from_bytes",
    "split_bytes",
    "bucket_rows",
]


#: Elements per block in the block-wise encoders/decoders. Working block by block keeps
#: every temporary small enough to stay in cache and to be recycled by the allocator:
#: on CPU a fresh tensor of the full size costs as much in page faults as a clone.
BLOCK_ELEMS = 1 << 18


def blocks(total: int, align: int, block: int = BLOCK_ELEMS) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) ranges covering [0, total), starts multiples of `align`."""
    step = max(align, block // align * align)
    for a in range(0, total, step):
        yield a, min(a + step, total)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) (any integer or bool dtype) into uint8.

    Codes are laid out LSB-first; the result has `ceil(len * bits / 8)` bytes.
    """
    codes = codes.reshape(-1)
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 1 and codes.device.type == "cpu":
        # numpy's packbits is a vectorized C loop, ~10x faster than shift-or in torch here.
        return torch.from_numpy(np.packbits(codes.contiguous().numpy(), bitorder="little"))
    if 8 % bits == 0:
        per = 8 // bits
        c = codes.to(torch.uint8)
        pad = (-n) % per
        if pad:
            c = torch.cat([c, c.new_zeros(pad)])
        c = c.view(-1, per)
        out = c[:, 0].clone()
        for j in range(1, per):
            out |= c[:, j] << (bits * j)
        return out
    # Odd widths (3, 5, 6, 7): spread each code into its bits, then regroup by 8.
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int16)
    bitplane = ((codes.to(torch.int16).unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    return pack_bits(bitplane, 1)


def pack_nonneg(t: torch.Tensor) -> torch.Tensor:
    """Bits (LSB first) of `t >= 0` for a float tensor: the sign bits of the 1-bit codecs."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16):
        # numpy compares and packs in one vectorized pass each, with no OpenMP start-up
        # cost per call; torch's `>=` is several times slower on this path.
        a = t.detach().contiguous().numpy()
        return torch.from_numpy(np.packbits(np.greater_equal(a, 0).reshape(-1), bitorder="little"))
    return pack_bits(t >= 0, 1)


def pack_greater(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bits (LSB first) of `a > b` for two float tensors of one shape (NaN compares False)."""
    if a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in (torch.float32, torch.float16):
        # As in pack_nonneg: numpy's compare is ~10x faster than torch's on one CPU thread.
        c = np.greater(a.detach().contiguous().numpy(), b.detach().contiguous().numpy())
        return torch.from_numpy(np.packbits(c.reshape(-1), bitorder="little"))
    return pack_bits(a > b, 1)


def _spread_table() -> np.ndarray:
    # Byte b -> the 16-bit word with bit i of b moved to bit 2i (zeros in between).
    out = np.zeros(256, dtype=np.uint16)
    for i in range(8):
        out |= ((np.arange(256, dtype=np.uint16) >> i) & 1) << (2 * i)
    return out


_SPREAD = _spread_table()
_SPREAD_T = torch.from_numpy(_SPREAD.astype(np.int32))


def interleave_bits(lo: torch.Tensor, hi: torch.Tensor, count: int) -> torch.Tensor:
    """2-bit codes (lo bit, hi bit) packed LSB first, from two packed 1-bit planes of `count` bits.

    Equal to `pack_bits(torch.stack([lo_bits, hi_bits], -1), 1)` without materializing
    the interleaved bit array: each plane byte is spread to 16 bits by a table lookup.
    """
    nbytes = packed_nbytes(count, 2)
    if lo.device.type == "cpu":
        words = np.take(_SPREAD, lo.contiguous().numpy()) | (np.take(_SPREAD, hi.contiguous().numpy()) << 1)
        return torch.from_numpy(words.view(np.uint8)[:nbytes])
    return interleave_bits_torch(lo, hi, nbytes)


def interleave_bits_torch(lo: torch.Tensor, hi: torch.Tensor, nbytes: int) -> torch.Tensor:
    """`interleave_bits` in torch ops on any device (the path for non-CPU tensors)."""
    table = _SPREAD_T.to(lo.device)
    words = table[lo.long()] | (table[hi.long()] << 1)
    # Little-endian uint16 -> bytes: the low byte holds the first four codes.
    return torch.stack([words & 0xFF, words >> 8], dim=-1).to(torch.uint8).reshape(-1)[:nbytes]


def byte_lookup(packed: torch.Tensor, table: torch.Tensor, count: int) -> torch.Tensor:
    """`table[b]` for every byte b of `packed` (table: (256, k)), flattened and cut to `count`.

    Decoding k codes per byte by one gather replaces unpacking bits and mapping codes to
    values in separate passes.
    """
    if packed.device.type != "cpu":
        return byte_lookup_torch(packed, table, count)
    out = torch.from_numpy(np.take(table.numpy(), packed.contiguous().numpy(), axis=0))
    return out.reshape(-1)[:count]


def byte_lookup_torch(packed: torch.Tensor, table: torch.Tensor, count: int) -> torch.Tensor:
    """`byte_lookup` in torch ops on any device (the path for non-CPU tensors)."""
    return table.to(packed.device)[packed.long()].reshape(-1)[:count]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `count` codes as uint8."""
    if bits == 8:
        return packed[:count]
    if bits == 1 and packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.contiguous().numpy(), count=count, bitorder="little"))
    if 8 % bits == 0:
        per = 8 // bits
        mask = (1 << bits) - 1
        out = torch.empty(packed.numel(), per, dtype=torch.uint8, device=packed.device)
        for j in range(per):
            torch.bitwise_and(packed >> (bits * j), mask, out=out[:, j])
        return out.reshape(-1)[:count]
    flat = unpack_bits(packed, 1, count * bits).view(count, bits).to(torch.int16)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int16)
    return (flat << shifts).sum(1).to(torch.uint8)


def index_width(n: int) -> int:
    """Bytes per index for positions in [0, n): the narrowest that fits."""
    return max(1, math.ceil(max(n - 1, 1).bit_length() / 8))


def pack_uint(values: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integers as `width` little-endian bytes each."""
    # int32 holds widths up to 3 without a sign problem; width 4 needs int64 so that
    # positions at or above 2**31 do not come back negative.
    container = torch.int32 if width <= 3 else torch.int64
    size = 4 if width <= 3 else 8
    b = values.to(container).contiguous().view(torch.uint8).view(-1, size)
    if width == size:
        return b.reshape(-1)
    return b[:, :width].reshape(-1)


def unpack_uint(data: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of `pack_uint`, as int64."""
    container = torch.int32 if width <= 3 else torch.int64
    size = 4 if width <= 3 else 8
    b = data[: count * width].view(count, width)
    if width != size:
        b = torch.cat([b, b.new_zeros(count, size - width)], dim=1)
    return b.contiguous().view(container).reshape(-1).to(torch.int64)


def split_bytes(buffer: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Cut a buffer into consecutive byte pieces of the given sizes."""
    if sum(sizes) != buffer.numel():
        raise ValueError(f"buffer: expected {sum(sizes)} bytes, got {buffer.numel()}")
    out, off = [], 0
    for s in sizes:
        out.append(buffer[off : off + s])
        off += s
    return out


def bucket_rows(t: torch.Tensor, bucket: int) -> list[torch.Tensor]:
    """A 1-D block that starts on a bucket boundary as matrices of one bucket per row
    (full buckets, then the short tail bucket if any)."""
    full = t.numel() - t.numel() % bucket
    rows = []
    if full:
        rows.append(t[:full].view(-1, bucket))
    if full < t.numel():
        rows.append(t[full:].view(1, -1))
    return rows
