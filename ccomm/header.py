"""`WireHeader`: what a payload says about itself on the wire, and the check of two of them.

A receiver decodes a peer's buffer with its own shape, dtype and codec (`Codec.wrap`).
When ranks disagree on any of them, the bytes may still decode, to garbage, or reach the
backend with unequal sizes, which gloo answers with an abort. A header sent ahead of (or
together with) the buffer lets every rank compare first and raise one clear error.

Layout: `HEADER_WORDS` int64 values, so it travels on any backend and device:

    0  magic and format version   `MAGIC << 16 | FORMAT_VERSION`
    1  codec name, ASCII bytes 0-7  (zero padded; enough to name every registered codec)
    2  codec name, ASCII bytes 8-15
    3  codec digest: 8 bytes of BLAKE2b over the full spec (parameters included)
    4  dtypes: tensor dtype code | buffer dtype code << 8
    5  buffer length in bytes
    6  number of dimensions (at most MAX_DIMS)
    7.. the dimensions, zero padded

`check_peers` compares this rank's header with every peer's and raises
`HeaderMismatchError` naming both sides (rank, codec, dtype, shape, bytes). The transport
(`ccomm.comm`) exchanges headers where it already exchanged sizes, so checking costs no
extra round there.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .payload import PayloadMeta

if TYPE_CHECKING:
    from .codecs.base import Codec

__all__ = [
    "FORMAT_VERSION",
    "HEADER_WORDS",
    "HEADER_BYTES",
    "MAX_DIMS",
    "RAW",
    "HeaderMismatchError",
    "WireHeader",
    "check_peers",
]

FORMAT_VERSION = 1
MAGIC = 0x43434F4D  # "CCOM"
#: Codec name of payloads that no codec made (raw tensors, e.g. ResidualCodec's warm-up).
RAW = "raw"
MAX_DIMS = 8
HEADER_WORDS = 7 + MAX_DIMS
HEADER_BYTES = HEADER_WORDS * 8
_NAME_BYTES = 16

#: Stable dtype codes (never renumber: they are part of the wire format).
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4,
    torch.uint8: 5, torch.int8: 6, torch.int16: 7, torch.int32: 8, torch.int64: 9, torch.bool: 10,
}
_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


class HeaderMismatchError(ValueError):
    """Ranks disagree on codec, dtype, shape or size of a payload (or a header is not one)."""


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def _digest(spec: str) -> int:
    return _signed(int.from_bytes(hashlib.blake2b(spec.encode(), digest_size=8).digest(), "little"))


@functools.lru_cache(maxsize=512)
def _identity(spec: str) -> tuple[str, int]:
    """(name, digest) of a codec spec: the name is the first stage's, or "chain"."""
    return ("chain" if "|" in spec else spec.partition(":")[0]), _digest(spec)


def _dtype_code(dtype: torch.dtype, field: str) -> int:
    code = _DTYPE_CODES.get(dtype)
    if code is None:
        raise ValueError(f"{field}: dtype {dtype} has no wire code; allowed: {', '.join(map(str, _DTYPE_CODES))}")
    return code


@dataclass(frozen=True)
class WireHeader:
    """The self-description of one payload (see the module docstring for the layout)."""

    codec: str  # codec name (at most 16 ASCII characters), e.g. "int2" or "chain"
    digest: int  # BLAKE2b-64 of the codec's full spec, as a signed int64
    shape: tuple[int, ...]
    dtype: torch.dtype  # dtype of the tensor the payload encodes
    buffer_dtype: torch.dtype  # dtype of the buffer that crosses the wire
    nbytes: int
    version: int = FORMAT_VERSION

    @classmethod
    def for_payload(cls, codec: "Codec | str", shape: Sequence[int], dtype: torch.dtype,
                    buffer: torch.Tensor) -> "WireHeader":
        """The header of `buffer`, a payload of `codec` for a tensor of `shape` and `dtype`."""
        spec = codec if isinstance(codec, str) else codec.spec
        name, digest = _identity(spec)
        return cls(name, digest, tuple(int(s) for s in shape), dtype, buffer.dtype,
                   buffer.numel() * buffer.element_size())

    @classmethod
    def of(cls, meta: PayloadMeta, buffer_dtype: torch.dtype, nbytes: int) -> "WireHeader":
        """The header of a `nbytes`-byte buffer of `buffer_dtype` whose local context is `meta`."""
        name, digest = _identity(RAW if meta.codec is None else meta.codec.spec)
        return cls(name, digest, tuple(int(s) for s in meta.shape), meta.dtype, buffer_dtype, nbytes)

    def pack(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The header as `HEADER_WORDS` int64 values on `device` (a copy of a cached tensor)."""
        return _packed(self, str(device)).clone()

    def _words(self) -> list[int]:
        if len(self.shape) > MAX_DIMS:
            raise ValueError(f"shape: {len(self.shape)} dimensions; a wire header holds at most {MAX_DIMS}")
        name = self.codec.encode("ascii")
        if len(name) > _NAME_BYTES:
            raise ValueError(f"codec: name {self.codec!r} is longer than {_NAME_BYTES} characters")
        name = name.ljust(_NAME_BYTES, b"\0")
        return [
            MAGIC << 16 | self.version,
            _signed(int.from_bytes(name[:8], "little")),
            _signed(int.from_bytes(name[8:], "little")),
            self.digest,
            _dtype_code(self.dtype, "dtype") | _dtype_code(self.buffer_dtype, "buffer_dtype") << 8,
            self.nbytes,
            len(self.shape),
            *self.shape,
            *([0] * (MAX_DIMS - len(self.shape))),
        ]

    @classmethod
    def unpack(cls, t: torch.Tensor, *, source: str = "peer") -> "WireHeader":
        """Read a packed header; `HeaderMismatchError` (naming `source`) if it is not one."""
        w = [int(v) for v in t.detach().to("cpu", torch.int64).reshape(-1).tolist()]
        if len(w) != HEADER_WORDS or w[0] >> 16 != MAGIC:
            raise HeaderMismatchError(f"{source} sent something that is not a ccomm wire header")
        version = w[0] & 0xFFFF
        if version != FORMAT_VERSION:
            raise HeaderMismatchError(
                f"{source} uses wire format version {version}, this rank uses {FORMAT_VERSION}")
        name = (w[1] % (1 << 64)).to_bytes(8, "little") + (w[2] % (1 << 64)).to_bytes(8, "little")
        ndim = w[6]
        tcode, bcode = w[4] & 0xFF, w[4] >> 8
        if not 0 <= ndim <= MAX_DIMS or tcode not in _DTYPES or bcode not in _DTYPES or w[5] < 0:
            raise HeaderMismatchError(f"{source} sent a corrupt wire header {w}")
        return cls(name.rstrip(b"\0").decode("ascii", "replace"), w[3], tuple(w[7 : 7 + ndim]),
                   _DTYPES[tcode], _DTYPES[bcode], w[5], version)

    def describe(self) -> str:
        """E.g. `int2#1a2b3c4d on float32 (64, 64), 1152 bytes (uint8)`."""
        dig = f"{self.digest % (1 << 64):016x}"[:8]
        return (f"{self.codec}#{dig} on {str(self.dtype).removeprefix('torch.')} {self.shape}, "
                f"{self.nbytes} bytes ({str(self.buffer_dtype).removeprefix('torch.')})")

    def differences(self, other: "WireHeader", *, same_size: bool = True) -> list[str]:
        """Fields on which `other` disagrees with this header (byte length only if `same_size`)."""
        diff = []
        if (self.codec, self.digest) != (other.codec, other.digest):
            diff.append("codec")
        if self.dtype != other.dtype or self.buffer_dtype != other.buffer_dtype:
            diff.append("dtype")
        if self.shape != other.shape:
            diff.append("shape")
        if same_size and self.nbytes != other.nbytes:
            diff.append("bytes")
        return diff


def check_peers(mine: WireHeader, peers: Sequence[WireHeader | torch.Tensor], *, rank: int, what: str,
                peer_ranks: Sequence[int] | None = None, same_size: bool = True) -> list[WireHeader]:
    """Compare this rank's header with every peer's; raise one error naming both sides.

    `peers[i]` comes from group rank `peer_ranks[i]` (default: `i`, an all-gather's
    order; this rank's own entry may be among them). Packed tensors are unpacked first.
    Every rank that sees the same headers raises the same message: each is compared
    with the lowest rank's, and the first disagreeing pair is named. `same_size=False` lets byte lengths differ (variable-size codecs).
    Returns the unpacked headers.
    """
    ranks = list(range(len(peers))) if peer_ranks is None else list(peer_ranks)
    fast = _all_agree(mine, peers, same_size)
    if fast is not None:
        return fast
    got = [p if isinstance(p, WireHeader) else WireHeader.unpack(p, source=f"{what}: rank {r}")
           for p, r in zip(peers, ranks)]
    # Compare against the lowest rank so every rank of an all-gather names the same pair.
    everyone = sorted({**dict(zip(ranks, got)), rank: mine}.items())
    r0, h0 = everyone[0]
    for r, h in everyone[1:]:
        diff = h0.differences(h, same_size=same_size)
        if diff:
            raise HeaderMismatchError(
                f"{what}: ranks disagree on {', '.join(diff)}: rank {r0} has {h0.describe()}, "
                f"rank {r} has {h.describe()}"
            )
    return got


@functools.lru_cache(maxsize=1024)
def _packed(h: WireHeader, device: str) -> torch.Tensor:
    # Headers repeat call after call (same codec, shape and size): pack each once.
    return torch.tensor(h._words(), dtype=torch.int64, device=device)


def _all_agree(mine: WireHeader, peers: Sequence[WireHeader | torch.Tensor], same_size: bool) -> list[WireHeader] | None:
    """The peers' headers when every packed one equals this rank's (but for the byte length
    if not `same_size`): one comparison instead of unpacking each. None otherwise."""
    if not peers or not all(isinstance(p, torch.Tensor) and p.numel() == HEADER_WORDS for p in peers):
        return None
    stack = torch.stack([p.reshape(-1) for p in peers])  # type: ignore[union-attr]
    differ = stack != _packed(mine, str(stack.device))
    if not same_size:
        differ[:, 5] = False
    if bool(differ.any()):
        return None
    return [mine if n == mine.nbytes else dataclasses.replace(mine, nbytes=n) for n in stack[:, 5].tolist()]
