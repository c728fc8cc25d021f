"""Byte packing of `ccomm.codecs._pack`: bit codes, integer indices, raw float bytes.

The wire layout is checked against an independent numpy description of it: codes form
one little-endian bit stream (bit b of code i at stream position i * bits + b) and
integers are little-endian with `width` bytes each.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ccomm.codecs._pack import (
    byte_lookup,
    byte_lookup_torch,
    from_bytes,
    index_width,
    interleave_bits,
    interleave_bits_torch,
    pack_bits,
    pack_greater,
    pack_uint,
    packed_nbytes,
    split_bytes,
    to_bytes,
    unpack_bits,
    unpack_uint,
)


@st.composite
def codes_and_width(draw: st.DrawFn) -> tuple[list[int], int]:
    bits = draw(st.integers(1, 8))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=150))
    return codes, bits


def _numpy_bitstream(codes: list[int], bits: int) -> np.ndarray:
    """Reference layout: the LSB-first bit stream of all codes, packed LSB-first into bytes."""
    c = np.asarray(codes, dtype=np.int64).reshape(-1, 1)
    stream = ((c >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


@given(codes_and_width())
def test_pack_bits_round_trip_and_layout(case: tuple[list[int], int]) -> None:
    codes, bits = case
    t = torch.tensor(codes, dtype=torch.int64)
    packed = pack_bits(t, bits)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == math.ceil(len(codes) * bits / 8) == packed_nbytes(len(codes), bits)
    np.testing.assert_array_equal(packed.numpy(), _numpy_bitstream(codes, bits))
    out = unpack_bits(packed, bits, len(codes))
    assert out.tolist() == codes


@given(st.lists(st.booleans(), max_size=100))
def test_pack_bits_accepts_bool_masks(mask: list[bool]) -> None:
    t = torch.tensor(mask, dtype=torch.bool)
    packed = pack_bits(t, 1)
    assert packed.numel() == math.ceil(len(mask) / 8)
    assert unpack_bits(packed, 1, len(mask)).bool().tolist() == mask


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_does_not_modify_input(bits: int) -> None:
    codes = torch.arange(37, dtype=torch.int64) % (1 << bits)
    before = codes.clone()
    pack_bits(codes, bits)
    assert torch.equal(codes, before)


@st.composite
def uints_and_width(draw: st.DrawFn) -> tuple[list[int], int]:
    width = draw(st.integers(1, 8))
    # int64 is the container for widths 4..8, so 8-byte values stop at 2**63 - 1. The upper
    # half of width 4's range (positions >= 2**31) has its own test below.
    hi = {8: (1 << 63) - 1}.get(width, (1 << (8 * width)) - 1)
    values = draw(st.lists(st.integers(0, hi), min_size=0, max_size=60))
    return values, width


@given(uints_and_width())
def test_pack_uint_round_trip_and_layout(case: tuple[list[int], int]) -> None:
    values, width = case
    t = torch.tensor(values, dtype=torch.int64)
    packed = pack_uint(t, width)
    assert packed.dtype == torch.uint8
    assert packed.numel() == len(values) * width
    expected = b"".join(v.to_bytes(width, "little") for v in values)
    assert bytes(packed.numpy().tobytes()) == expected
    out = unpack_uint(packed, width, len(values))
    assert out.dtype == torch.int64
    assert out.tolist() == values


def test_pack_uint_width4_upper_half() -> None:
    values = [1 << 31, (1 << 32) - 1]
    packed = pack_uint(torch.tensor(values, dtype=torch.int64), 4)
    assert bytes(packed.numpy().tobytes()) == b"".join(v.to_bytes(4, "little") for v in values)
    assert unpack_uint(packed, 4, 2).tolist() == values


@pytest.mark.parametrize(
    ("n", "width"),
    [
        (1, 1),
        (200, 1),
        (256, 1),  # largest position 255 still fits a byte
        (257, 2),
        (60000, 2),
        (65536, 2),
        (65537, 3),
        (1 << 24, 3),
        ((1 << 24) + 1, 4),
        ((1 << 32) + 1, 5),
    ],
)
def test_index_width_is_the_narrowest(n: int, width: int) -> None:
    assert index_width(n) == width
    # Independent statement of "narrowest": n - 1 fits, and one byte fewer would not.
    assert n - 1 < 256**width
    assert width == 1 or n - 1 >= 256 ** (width - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
def test_float_bytes_round_trip_even_when_misaligned(dtype: torch.dtype) -> None:
    vals = (torch.arange(9) * 1.25 - 3).to(dtype)
    # One leading byte makes the float piece start at an odd offset.
    buf = torch.cat([torch.tensor([7], dtype=torch.uint8), to_bytes(vals)])
    head, body = split_bytes(buf, [1, buf.numel() - 1])
    assert head.tolist() == [7]
    assert torch.equal(from_bytes(body, dtype, 9), vals)
    assert to_bytes(vals).numel() == 9 * vals.element_size()


def test_split_bytes_rejects_wrong_total() -> None:
    with pytest.raises(ValueError, match="buffer"):
        split_bytes(torch.zeros(10, dtype=torch.uint8), [3, 3])


# --- pack_greater, interleave_bits, byte_lookup (the activation codecs' fast paths) --------

#: Lengths that are not multiples of 8 (a partial last byte), plus one that is.
ODD_LENGTHS = [1, 3, 7, 13, 64, 1001]


def _greater_operands(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random a, b of n entries with ties, signed zeros and NaN on either side (or both)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    b[::5] = a[::5]  # ties: a > b is False
    a[1::7], b[1::7] = 0.0, -0.0  # 0.0 > -0.0 is False too
    a[2::6] = math.nan
    b[3::9] = math.nan
    b[2::12] = math.nan  # NaN on both sides
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", ODD_LENGTHS)
def test_pack_greater_equals_packed_comparison(dtype: torch.dtype, n: int) -> None:
    a, b = _greater_operands(n, dtype, seed=n)
    packed = pack_greater(a, b)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, 1)
    assert torch.equal(packed, pack_bits(a > b, 1))
    # Independent statement: bit i of the LSB-first stream is a_i > b_i, NaN compares False.
    expected = [bool(x > y) for x, y in zip(a.tolist(), b.tolist())]
    assert unpack_bits(packed, 1, n).bool().tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pack_greater_on_matrices_and_views_follows_logical_order(dtype: torch.dtype) -> None:
    a, b = _greater_operands(13 * 7, dtype, seed=21)
    a, b = a.view(13, 7), b.view(13, 7)
    assert torch.equal(pack_greater(a, b), pack_bits(a > b, 1))
    at, bt = a.t(), b.t()  # non-contiguous (7, 13) views
    assert torch.equal(pack_greater(at, bt), pack_bits(at > bt, 1))


@pytest.mark.parametrize(
    ("da", "db"),
    [
        (torch.float32, torch.float16),  # mixed dtypes: torch fallback, compared after promotion
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),  # no numpy bfloat16: torch fallback
        (torch.float64, torch.float64),
    ],
)
def test_pack_greater_torch_fallback_matches(da: torch.dtype, db: torch.dtype) -> None:
    a, b = _greater_operands(1001, torch.float32, seed=22)
    a, b = a.to(da), b.to(db)
    packed = pack_greater(a, b)
    assert packed.numel() == packed_nbytes(1001, 1)
    assert torch.equal(packed, pack_bits(a > b, 1))


def _bit_planes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, generator=g) < 0.5, torch.rand(count, generator=g) < 0.3


@pytest.mark.parametrize("count", [0, 1, 3, 5, 8, 13, 64, 1001])
def test_interleave_bits_equals_packing_the_interleaved_planes(count: int) -> None:
    lo_bits, hi_bits = _bit_planes(count, seed=count)
    lo, hi = pack_bits(lo_bits, 1), pack_bits(hi_bits, 1)
    out = interleave_bits(lo, hi, count)
    assert out.dtype == torch.uint8 and out.dim() == 1
    assert torch.equal(out, pack_bits(torch.stack([lo_bits, hi_bits], -1), 1))
    # As 2-bit codes: bit 0 from the lo plane, bit 1 from the hi plane.
    codes = lo_bits.to(torch.int64) + 2 * hi_bits.to(torch.int64)
    assert unpack_bits(out, 2, count).tolist() == codes.tolist()


@pytest.mark.parametrize("count", [1, 3, 5, 13, 64, 1001])
def test_interleave_bits_torch_path_matches_the_cpu_path(count: int) -> None:
    # The branch GPU tensors take, run here on CPU tensors: same bytes as the numpy path.
    lo_bits, hi_bits = _bit_planes(count, seed=200 + count)
    lo, hi = pack_bits(lo_bits, 1), pack_bits(hi_bits, 1)
    out = interleave_bits_torch(lo, hi, packed_nbytes(count, 2))
    assert out.dtype == torch.uint8 and torch.equal(out, interleave_bits(lo, hi, count))


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 9, 13, 63, 64, 65, 1001])
def test_interleave_bits_returns_packed_nbytes(count: int) -> None:
    lo_bits, hi_bits = _bit_planes(count, seed=100 + count)
    out = interleave_bits(pack_bits(lo_bits, 1), pack_bits(hi_bits, 1), count)
    assert out.shape == (packed_nbytes(count, 2),) and packed_nbytes(count, 2) == math.ceil(count / 4)


def test_interleave_bits_reads_plane_slices_at_an_offset() -> None:
    # The codec passes block slices of larger buffers; a slice with a storage offset must
    # read its own bytes.
    lo_bits, hi_bits = _bit_planes(8 * 20, seed=23)
    lo, hi = pack_bits(lo_bits, 1), pack_bits(hi_bits, 1)
    out = interleave_bits(lo[5:12], hi[5:12], 8 * 7)
    expected = pack_bits(torch.stack([lo_bits[40:96], hi_bits[40:96]], -1), 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_byte_lookup_equals_table_indexing(k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(24 + k)
    table = (torch.randn(256, k, generator=g) * 100).to(dtype)
    packed = torch.randint(0, 256, (37,), generator=g, dtype=torch.uint8)
    packed[:4] = torch.tensor([0, 255, 128, 1], dtype=torch.uint8)  # both ends of the table
    for count in sorted({0, 1, k, 37 * k - 5, 37 * k}):
        out = byte_lookup(packed, table, count)
        assert out.dtype == dtype and out.shape == (count,)
        assert torch.equal(out, table[packed.long()].reshape(-1)[:count])
    # A slice at an offset (as the codecs pass block slices), and a non-contiguous view.
    for view in (packed[3:30], packed[1::2]):
        count = view.numel() * k - 1
        assert torch.equal(byte_lookup(view, table, count), table[view.long()].reshape(-1)[:count])


@pytest.mark.parametrize("k", [1, 4, 8])
def test_byte_lookup_torch_path_matches_the_cpu_path(k: int) -> None:
    g = torch.Generator().manual_seed(40 + k)
    table = torch.randn(256, k, generator=g)
    packed = torch.randint(0, 256, (53,), generator=g, dtype=torch.uint8)
    for count in (1, 53 * k - 3, 53 * k):
        assert torch.equal(byte_lookup_torch(packed, table, count), byte_lookup(packed, table, count))
