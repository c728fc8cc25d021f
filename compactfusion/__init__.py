"""CompactFusion: residual-compressed K/V exchange for parallel diffusion-transformer inference.

`parallelize(transformer, CompactConfig(...), group=None) -> Handle` splits a diffusers
DiT / PixArt / Flux transformer's tokens across the ranks of a process group and swaps its
self-attention processors for ring, patch or DistriFusion attention whose exchanged K/V go
through `ccomm.ResidualCodec`. See docs/compactfusion.md and the design record,
docs/design/compactfusion.md.
"""
from .config import CompactConfig
from .errors import BaseMismatchError, CompactStateError
from .parallel import MODEL_SPECS, Handle, parallelize
from .state import CompactState, KVKey

__all__ = [
    "CompactConfig",
    "parallelize",
    "Handle",
    "KVKey",
    "CompactState",
    "CompactStateError",
    "BaseMismatchError",
    "MODEL_SPECS",
]
