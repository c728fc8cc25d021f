"""ccomm.header: pack/unpack round trip, refusal of junk, and errors naming both sides."""
from __future__ import annotations

import pytest
import torch

from ccomm import make_codec
from ccomm.header import (
    FORMAT_VERSION,
    HEADER_BYTES,
    HEADER_WORDS,
    MAX_DIMS,
    HeaderMismatchError,
    WireHeader,
    check_peers,
)

try:  # tests/ccomm as a package or as a rootdir-inserted directory
    from ._specs import ALL_SPECS, DTYPES
except ImportError:
    from _specs import ALL_SPECS, DTYPES


def _header(spec: str = "int2", shape: tuple[int, ...] = (64, 64), dtype: torch.dtype = torch.float32) -> WireHeader:
    codec = make_codec(spec)
    return WireHeader.for_payload(codec, shape, dtype, codec.encode(torch.ones(shape, dtype=dtype)).buffer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_round_trip_for_every_codec(spec: str, dtype: torch.dtype) -> None:
    h = _header(spec, (3, 5, 7), dtype)
    t = h.pack()
    assert t.dtype == torch.int64 and t.numel() == HEADER_WORDS and HEADER_BYTES == 8 * HEADER_WORDS
    back = WireHeader.unpack(t)
    assert back == h
    assert back.nbytes == make_codec(spec).nbytes((3, 5, 7), dtype)
    assert back.version == FORMAT_VERSION


@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 3, 4, 5, 6, 7, 8, 9)])
def test_shapes_of_zero_to_max_dims(shape: tuple[int, ...]) -> None:
    h = WireHeader("identity", 0, shape, torch.float16, torch.float16, 10)
    assert WireHeader.unpack(h.pack()).shape == shape


def test_too_many_dims_and_long_names_are_refused() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_DIMS}"):
        WireHeader("identity", 0, (1,) * (MAX_DIMS + 1), torch.float32, torch.float32, 4).pack()
    with pytest.raises(ValueError, match="longer than 16"):
        WireHeader("x" * 17, 0, (1,), torch.float32, torch.float32, 4).pack()
    with pytest.raises(ValueError, match="no wire code"):
        WireHeader("identity", 0, (1,), torch.complex64, torch.float32, 4).pack()


def test_the_digest_tells_parameters_apart() -> None:
    a, b = _header("topk:ratio=0.1"), _header("topk:ratio=0.2")
    assert a.codec == b.codec == "topk" and a.digest != b.digest
    assert "codec" in a.differences(b)
    assert _header("randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4").codec == "chain"


def test_junk_and_other_versions_are_refused() -> None:
    with pytest.raises(HeaderMismatchError, match="rank 3 sent something that is not a ccomm wire header"):
        WireHeader.unpack(torch.arange(HEADER_WORDS), source="rank 3")
    with pytest.raises(HeaderMismatchError, match="not a ccomm wire header"):
        WireHeader.unpack(torch.zeros(4, dtype=torch.int64))
    t = _header().pack()
    t[0] += 1
    with pytest.raises(HeaderMismatchError, match=f"version {FORMAT_VERSION + 1}, this rank uses {FORMAT_VERSION}"):
        WireHeader.unpack(t)
    t = _header().pack()
    t[6] = MAX_DIMS + 1
    with pytest.raises(HeaderMismatchError, match="corrupt"):
        WireHeader.unpack(t)


@pytest.mark.parametrize(
    "other, field",
    [
        (("int2", (32, 64)), "shape"),          # the (64, 64) vs (32, 64)
        (("binary", (64, 64)), "codec"),        # the int2 vs binary
        (("int2", (64, 64), torch.float16), "dtype"),
    ],
)
def test_check_peers_names_both_sides(other: tuple, field: str) -> None:
    mine, theirs = _header(), _header(*other)
    with pytest.raises(HeaderMismatchError) as err:
        check_peers(mine, [mine.pack(), theirs.pack()], rank=0, what="allgather_payloads(key='x')")
    msg = str(err.value)
    assert msg.startswith("allgather_payloads(key='x'): ranks disagree on ") and field in msg
    assert f"rank 0 has {mine.describe()}" in msg and f"rank 1 has {theirs.describe()}" in msg
    # The other rank, seeing the same headers, raises the same message.
    with pytest.raises(HeaderMismatchError) as err1:
        check_peers(theirs, [mine.pack(), theirs.pack()], rank=1, what="allgather_payloads(key='x')")
    assert str(err1.value) == msg


def test_check_peers_accepts_agreement_and_optionally_unequal_sizes() -> None:
    mine = _header()
    assert check_peers(mine, [mine, mine], rank=1, what="w") == [mine, mine]
    longer = WireHeader(mine.codec, mine.digest, mine.shape, mine.dtype, mine.buffer_dtype, mine.nbytes + 8)
    with pytest.raises(HeaderMismatchError, match="bytes"):
        check_peers(mine, [longer], rank=0, what="w", peer_ranks=[1])
    check_peers(mine, [longer], rank=0, what="w", peer_ranks=[1], same_size=False)
