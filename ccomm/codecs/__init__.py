"""Codecs, one algorithm per module; importing this package registers them all."""
from .base import Codec, FLOAT_DTYPES
from .cast import Bf16, Fp16, Identity
from .topk import TopK
from .approx_topk import ApproxTopK
from .randomk import RandomK
from .quantize import Quantize
from .qsgd import QSGD
from .sign import Sign
from .binary import Binary
from .int2 import Int2
from .lowrank import LowRank
from .lowrank_int4 import LowRankInt4
from .chain import Chain
from .stacked import Stacked

__all__ = [
    "Codec",
    "FLOAT_DTYPES",
    "Identity",
    "Fp16",
    "Bf16",
    "TopK",
    "ApproxTopK",
    "RandomK",
    "Quantize",
    "QSGD",
    "Sign",
    "Binary",
    "Int2",
    "LowRank",
    "LowRankInt4",
    "Chain",
    "Stacked",
]
