"""Codec specs shared by the codec tests: every registered name with parameters that make
small test tensors interesting (e.g. more than one kept entry), plus two chains."""
from __future__ import annotations

import torch

from ccomm import available_codecs

DEFAULT_ARGS = {
    "topk": "ratio=0.3",
    "approx_topk": "ratio=0.3",
    "randomk": "ratio=0.3",
    "quantize": "bits=4",
    "lowrank": "rank=2",
    "lowrank_int4": "rank=2",
}
CHAINS = [
    "randomk:ratio=0.1|topk:ratio=0.1|quantize:bits=4",
    "approx_topk:ratio=0.1|quantize:bits=2",
]
ALL_SPECS = [f"{n}:{DEFAULT_ARGS[n]}" if n in DEFAULT_ARGS else n for n in available_codecs()] + CHAINS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
