"""Every registered codec refuses a buffer that cannot encode the receiver's tensor.

A receiver decodes a peer's buffer with its own shape and dtype (`Codec.wrap`), so a
peer with another shape or codec, or a truncated or extended transfer, must give a
`ValueError` naming the sizes, never garbage or an internal error. Every name in
`available_codecs()` (plus the chains) is covered without listing it here.
"""
from __future__ import annotations

import pytest
import torch

from ccomm import Payload, make_codec

try:  # tests/ccomm as a package or as a rootdir-inserted directory
    from ._specs import ALL_SPECS, DTYPES
except ImportError:
    from _specs import ALL_SPECS, DTYPES

SHAPE = (64, 64)


def _payload(spec: str, dtype: torch.dtype, shape: tuple[int, ...] = SHAPE) -> Payload:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return make_codec(spec).encode(x)


def _bytes_of(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """`buf` cut or zero-extended to `nbytes` bytes, in buf's dtype (whole elements)."""
    raw = buf.view(torch.uint8)
    if nbytes <= raw.numel():
        raw = raw[:nbytes]
    else:
        raw = torch.cat([raw, raw.new_zeros(nbytes - raw.numel())])
    return raw.view(buf.dtype) if buf.dtype != torch.uint8 else raw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("change", ["truncated", "extended"])
def test_decode_refuses_a_buffer_of_the_wrong_length(spec: str, dtype: torch.dtype, change: str) -> None:
    p = _payload(spec, dtype)
    codec = make_codec(spec)
    step = p.buffer.element_size()
    n = p.nbytes - step if change == "truncated" else p.nbytes + step
    bad = p.with_buffer(_bytes_of(p.buffer, n))
    with pytest.raises(ValueError, match=rf"payload has {n} bytes, expected exactly {p.nbytes}.*shape \(64, 64\)"):
        codec.decode(bad)
    codec.decode(p)  # the untouched payload still decodes


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("peer_shape", [(32, 64), (64, 32), (128, 64), (4096,)])
def test_decode_refuses_a_peer_buffer_for_another_shape(spec: str, peer_shape: tuple[int, ...]) -> None:
    """The issue's case: shapes (64, 64) here, another shape on the peer."""
    codec = make_codec(spec)
    peer = _payload(spec, torch.float32, peer_shape)
    mine = codec.nbytes(SHAPE, torch.float32)
    received = codec.wrap(peer.buffer, SHAPE, torch.float32)
    if peer.nbytes == mine:
        # Same element count and a layout-free codec: the bytes are a valid payload for
        # this shape, which only the wire header (ccomm.header) can tell apart.
        assert codec.decode(received).shape == SHAPE
        return
    with pytest.raises(ValueError, match=r"expected exactly \d+ .*shape \(64, 64\)"):
        codec.decode(received)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("other", ["int2", "binary", "topk:ratio=0.1", "quantize:bits=2", "fp16"])
def test_decode_refuses_another_codecs_buffer(spec: str, other: str) -> None:
    if make_codec(other).spec == make_codec(spec).spec:
        return  # the same codec: covered by the tests above
    codec = make_codec(spec)
    peer = _payload(other, torch.float32)
    if peer.buffer.dtype == codec.empty_dtype(torch.float32) and peer.nbytes == codec.nbytes(SHAPE, torch.float32):
        pytest.skip(f"{other} and {spec} have the same payload size here; the wire header tells them apart")
    with pytest.raises(ValueError, match=r"payload (buffer has dtype|has \d+ bytes)"):
        codec.decode(codec.wrap(peer.buffer, SHAPE, torch.float32))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_decode_of_an_empty_tensor_refuses_a_non_empty_buffer(spec: str) -> None:
    codec = make_codec(spec)
    empty = _payload(spec, torch.float32, (0, 8))
    assert codec.decode(empty).shape == (0, 8)
    extra = torch.zeros(4, dtype=empty.buffer.dtype)
    with pytest.raises(ValueError, match="expected exactly 0"):
        codec.decode(empty.with_buffer(extra))
