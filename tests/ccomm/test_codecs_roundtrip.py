"""Round trip and payload size of every registered codec (and the issue's chains).

Every name in `available_codecs()` is tested, so a newly registered codec is covered
without touching this file (it gets its constructor defaults unless listed in
`DEFAULT_ARGS`). The size bounds are written from issue 2's table, not from the codecs.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ccomm import Payload, available_codecs, make_codec
from ccomm.codecs import Codec

try:  # tests/ccomm as a package or as a rootdir-inserted directory
    from ._specs import ALL_SPECS, CHAINS, DEFAULT_ARGS, DTYPES
except ImportError:
    from _specs import ALL_SPECS, CHAINS, DEFAULT_ARGS, DTYPES
#: The issue allows this much framing on top of each codec's size formula.
HEADER_BYTES = 64
#: Test values stay where every codec's arithmetic is representable in fp16 (see
#: test_codecs_reference.py for inputs near the fp16 maximum).
VALUE_BOUND = 100.0


@st.composite
def layouts(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of any rank 0..3 (sizes 0, 1 and odd included), dtype and memory layout."""
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(0, 3))
    cap = {1: 97, 2: 13, 3: 5}.get(ndim, 1)
    shape = tuple(draw(st.integers(0, cap)) for _ in range(ndim))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"])) if ndim else "contiguous"
    if layout == "transposed" and ndim >= 2:
        base_shape = shape[::-1]
    elif layout == "strided":
        base_shape = shape[:-1] + (2 * shape[-1] + 1,)
    else:
        layout, base_shape = "contiguous", shape
    elements = st.floats(-VALUE_BOUND, VALUE_BOUND, width=32)
    base = torch.from_numpy(draw(arrays(np.float32, base_shape, elements=elements))).to(dtype)
    if layout == "transposed":
        x = base.permute(*reversed(range(ndim)))
    elif layout == "strided":
        x = base[..., 1::2]
    else:
        x = base
    assert x.shape == shape
    return x


def _check_payload_form(codec: Codec, x: torch.Tensor, p: Payload) -> None:
    buf = p.buffer
    assert buf.dim() == 1 and buf.is_contiguous()
    assert p.nbytes == buf.numel() * buf.element_size()
    bound = codec.nbytes(x.shape, x.dtype)
    assert p.nbytes <= bound
    if codec.fixed_size:
        assert p.nbytes == bound
    if codec.additive:
        # Summable numbers, so an all-reduce can add payloads.
        assert buf.dtype.is_floating_point
    else:
        assert buf.dtype == torch.uint8


@pytest.mark.parametrize("spec", ALL_SPECS)
@given(x=layouts())
def test_round_trip(spec: str, x: torch.Tensor) -> None:
    codec = make_codec(spec)
    before = x.clone()
    stride_before = x.stride()
    p = codec.encode(x)
    assert torch.equal(x, before), "encode modified its input"
    assert x.stride() == stride_before
    d = codec.decode(p)
    assert d.shape == x.shape
    assert d.dtype == x.dtype
    assert d.device == x.device
    assert torch.isfinite(d).all(), "finite input decoded to non-finite values"
    _check_payload_form(codec, x, p)
    buf = p.buffer
    # The receiver's path: only the buffer arrives, the context comes from the codec.
    received = codec.decode(codec.wrap(buf.clone(), x.shape, x.dtype))
    assert torch.equal(received, d)
    # Decoding must not consume or alter the payload.
    assert torch.equal(codec.decode(p), d)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_round_trip_fixed_layouts(spec: str) -> None:
    """The layouts hypothesis may not pick together, spelled out once per codec and dtype."""
    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        base = torch.randn(6, 10, 4, generator=g).to(dtype)
        for x in (
            base[0, 0, 0],  # 0-d view
            base.reshape(-1)[:1],  # 1 element
            base[:, :0],  # empty
            base.transpose(0, 2),  # non-contiguous, 3-D
            base[::2, 1::3],  # strided slice
            base[1].t(),  # transposed 2-D
            base.reshape(-1)[::7],  # strided 1-D, odd length
        ):
            codec = make_codec(spec)
            before = x.clone()
            p = codec.encode(x)
            d = codec.decode(p)
            assert torch.equal(x, before)
            assert d.shape == x.shape and d.dtype == x.dtype
            assert torch.isfinite(d).all()
            _check_payload_form(codec, x, p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_is_lossless(dtype: torch.dtype) -> None:
    x = torch.randn(9, 7, generator=torch.Generator().manual_seed(2)).to(dtype).t()
    codec = make_codec("identity")
    assert torch.equal(codec.decode(codec.encode(x)), x)


def test_identity_buffer_is_not_the_input() -> None:
    # An in-place all-reduce on the buffer must not write into the caller's tensor.
    x = torch.randn(16, generator=torch.Generator().manual_seed(8))
    before = x.clone()
    p = make_codec("identity").encode(x)
    p.buffer.add_(1.0)
    assert torch.equal(x, before)


# --- payload size bounds (issue 2) --------------------------------------------------------

def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nc(shape: tuple[int, ...]) -> tuple[int, int]:
    """(N tokens, C channels): C is the last dimension, as the activation codecs define it."""
    n = math.prod(shape)
    if len(shape) <= 1:
        return 1, n
    return n // shape[-1], shape[-1]


def _narrowest(n: int) -> int:
    """Bytes of the narrowest unsigned integer holding positions 0..n-1."""
    width = 1
    while n - 1 >= 256**width:
        width += 1
    return width


def _issue_bound(spec: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Issue 2's payload bound, without the 64 header bytes."""
    n = math.prod(shape)
    b = _itemsize(dtype)
    nn, cc = _nc(shape)
    name, _, args = spec.partition(":")
    kw = dict(a.split("=") for a in args.split(",") if a)
    if name == "identity":
        return n * b
    if name in ("fp16", "bf16"):
        return 2 * n
    if name in ("topk", "approx_topk"):
        k = math.ceil(float(kw["ratio"]) * n)
        return k * (b + 4)  # issue: at most 8k bytes for fp32 (value + at most 4 index bytes)
    if name == "randomk":
        return math.ceil(float(kw["ratio"]) * n) * b
    if name == "quantize":
        bits, bucket = int(kw.get("bits", 8)), int(kw.get("bucket", 512))
        return math.ceil(n * bits / 8) + 2 * 4 * math.ceil(n / bucket)  # fp32 min and step per bucket
    if name == "qsgd":
        levels, bucket = int(kw.get("levels", 16)), int(kw.get("bucket", 512))
        code_bits = 1 + math.ceil(math.log2(levels + 1))  # sign + level
        return math.ceil(n * code_bits / 8) + 4 * math.ceil(n / bucket)  # fp32 norm per bucket
    if name == "sign":
        return math.ceil(n / 8) + b
    if name == "binary":
        return math.ceil(nn * cc / 8) + (nn + cc) * b
    if name == "int2":
        return math.ceil(nn * cc / 4) + (nn + cc) * b
    if name == "lowrank":
        r = min(int(kw["rank"]), nn, cc)
        return r * (nn + cc) * b
    if name == "lowrank_int4":
        r = min(int(kw["rank"]), nn, cc)
        return r * (math.ceil(nn / 2) + math.ceil(cc / 2)) + 4 * r * b  # codes + per-row/column min, step
    raise AssertionError(f"no bound written for {spec}")


BOUND_SPECS = [
    "identity",
    "fp16",
    "bf16",
    "topk:ratio=0.1",
    "topk:ratio=0.01",
    "approx_topk:ratio=0.05",
    "randomk:ratio=0.1",
    "quantize:bits=8",
    "quantize:bits=4",
    "quantize:bits=2",
    "quantize:bits=1",
    "quantize:bits=3,bucket=100",
    "qsgd:levels=16",
    "qsgd:levels=3",
    "sign",
    "binary",
    "int2",
    "lowrank:rank=4",
    "lowrank:rank=50",
    "lowrank_int4:rank=4",
]
BOUND_SHAPES = [(1000,), (37, 53), (4, 9, 16), (1, 1), (70001,)]


@pytest.mark.parametrize("spec", BOUND_SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_payload_within_issue_bound(spec: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    for shape in BOUND_SHAPES:
        x = torch.randn(shape, generator=g).to(dtype)
        p = make_codec(spec).encode(x)
        bound = _issue_bound(spec, shape, dtype)
        assert p.nbytes <= bound + HEADER_BYTES, (shape, p.nbytes, bound)
        if dtype == torch.float32 and spec.startswith(("topk", "approx_topk")):
            k = math.ceil(float(spec.split("=")[1]) * math.prod(shape))
            assert p.nbytes <= 8 * k + HEADER_BYTES


#: Codecs whose size the design record states exactly (docs/design/compactfusion.md#codec-contract).
EXACT_SPECS = ["identity", "fp16", "bf16", "sign", "binary", "int2", "lowrank:rank=4", "lowrank_int4:rank=4"]


@pytest.mark.parametrize("spec", EXACT_SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (2, 5, 7), (33,), (1, 1)])
def test_payload_equals_design_formula(spec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert make_codec(spec).encode(x).nbytes == _issue_bound(spec, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_randomk_sends_values_only(dtype: torch.dtype) -> None:
    x = torch.randn(1234, generator=torch.Generator().manual_seed(9)).to(dtype)
    p = make_codec("randomk:ratio=0.1").encode(x)
    assert p.nbytes == math.ceil(0.1 * 1234) * _itemsize(dtype)
    assert p.buffer.dtype == dtype


@pytest.mark.parametrize(("n", "width"), [(200, 1), (60000, 2), (70000, 3)])
@pytest.mark.parametrize("spec", ["topk:ratio=0.05", "approx_topk:ratio=0.05"])
def test_sparsifier_indices_use_narrowest_width(spec: str, n: int, width: int) -> None:
    assert _narrowest(n) == width
    x = torch.randn(n, generator=torch.Generator().manual_seed(5))
    p = make_codec(spec).encode(x)
    k = math.ceil(0.05 * n)
    assert p.nbytes == k * (4 + width)
    # The narrow indices must still address the far end of the tensor.
    d = make_codec(spec).decode(make_codec(spec).encode(x))
    kept = torch.nonzero(d).squeeze(1)
    assert kept.numel() == k
    assert torch.equal(d[kept], x[kept])
    if n > 256:
        assert int(kept.max()) > 255


def test_chain_payload_sizes() -> None:
    n = 100_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(6))
    # randomk (no indices) -> topk (indices into randomk's k1 values) -> 4-bit codes of k2 values.
    k1 = math.ceil(0.1 * n)
    k2 = math.ceil(0.1 * k1)
    bound = math.ceil(k2 * 4 / 8) + 8 * math.ceil(k2 / 512) + k2 * _narrowest(k1)
    p = make_codec(CHAINS[0]).encode(x)
    assert p.nbytes <= bound + HEADER_BYTES
    k = math.ceil(0.1 * n)
    bound = math.ceil(k * 2 / 8) + 8 * math.ceil(k / 512) + k * _narrowest(n)
    p = make_codec(CHAINS[1]).encode(x)
    assert p.nbytes <= bound + HEADER_BYTES
    p = make_codec("randomk:ratio=0.5|fp16").encode(x)
    assert p.nbytes == 2 * math.ceil(0.5 * n)
    assert p.buffer.dtype == torch.float16


def test_approx_topk_meets_k_within_ten_percent_on_large_inputs() -> None:
    """Above the exact-selection cutoff the threshold is sampled (DGC-style)."""
    n, ratio = 400_000, 0.01
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3)  # heavy-ish tails
    codec = make_codec(f"approx_topk:ratio={ratio}")
    d = codec.decode(codec.encode(x))
    k = math.ceil(ratio * n)
    kept = torch.nonzero(d).squeeze(1)
    assert abs(kept.numel() - k) <= 0.1 * k
    assert torch.equal(d[kept], x[kept])
    exact = set(torch.topk(x.abs(), k).indices.tolist())
    recall = len(exact & set(kept.tolist())) / k
    # The issue's own tolerance on k applied to the selected set: at most 10% may differ.
    assert recall >= 0.9
