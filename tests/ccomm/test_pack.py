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
    from_bytes,
    index_width,
    pack_bits,
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
