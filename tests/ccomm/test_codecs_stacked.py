"""`ccomm.codecs.Stacked`: T tensors in one payload, byte-identical to T separate payloads."""
from __future__ import annotations

import pytest
import torch

from _specs import ALL_SPECS, DTYPES
from ccomm import make_codec
from ccomm.codecs import Stacked
from ccomm.codecs._activation import STACK_ELEMS
from ccomm.codecs._pack import to_bytes

# (T, N, C): fused-path shapes (codes fill whole bytes), odd shapes (loop fallback), a large stack
SHAPES = [(2, 64, 32), (2, 7, 5), (3, 9, 8), (2, 33, 24)]


def _stack(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[1] *= 50.0  # very different statistics per slice: shared scales would show
    return x.to(dtype)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_stack_equals_separate_payloads(spec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    inner = make_codec(spec)
    if not inner.fixed_size or "randomk" in spec:
        with pytest.raises(ValueError, match="fixed sizes|per-call context"):
            Stacked(inner)
        return
    st = Stacked(spec)
    x = _stack(shape, dtype)
    p = st.encode(x)
    separate = [inner.encode(x[t]) for t in range(shape[0])]
    assert torch.equal(p.buffer.view(torch.uint8), torch.cat([to_bytes(q.buffer) for q in separate]))
    assert p.nbytes == st.nbytes(x.shape, dtype) == shape[0] * inner.nbytes(shape[1:], dtype)
    # a receiver decodes the bytes alone; so does the sender's own-base update
    got = st.decode(st.wrap(p.buffer.clone(), x.shape, dtype))
    want = torch.stack([inner.decode(q) for q in separate])
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("spec, bits", [("binary", 1), ("int2", 2)])
def test_fused_paths_are_taken_where_they_apply(spec: str, bits: int) -> None:
    inner = make_codec(spec)
    st = Stacked(inner)
    x = _stack((2, 64, 32), torch.float16)
    assert inner.encode_stack(x) is not None  # type: ignore[attr-defined]
    assert inner.decode_stack(st.encode(x).buffer, 2, torch.Size((64, 32)), torch.float16) is not None  # type: ignore[attr-defined]
    # codes of one matrix not filling whole bytes, or a stack too large: the loop
    assert inner.encode_stack(_stack((2, 7, 5), torch.float16)) is None  # type: ignore[attr-defined]
    big = torch.zeros(2, STACK_ELEMS // 64 + 8, 32)
    assert inner.encode_stack(big) is None  # type: ignore[attr-defined]


def test_nonfinite_and_zero_slices_stay_per_slice() -> None:
    for spec in ("binary", "int2"):
        st, inner = Stacked(spec), make_codec(spec)
        x = torch.zeros(2, 16, 8)
        x[1, 3, 2] = float("inf")
        got = st.decode(st.encode(x))
        assert torch.equal(got[0], torch.zeros(16, 8))  # all-zero slice decodes to zeros
        assert not torch.isfinite(got[1]).all()  # the non-finite slice is poisoned, not hidden
        assert torch.equal(got[1].isnan(), inner.decode(inner.encode(x[1])).isnan())


def test_stacked_rejects_a_non_stack() -> None:
    with pytest.raises(ValueError, match="stack"):
        Stacked("binary").encode(torch.ones(5))
    assert Stacked("int2").spec == "stacked:inner=int2"
