"""ccomm: the shared compression layer.

Codecs turn tensors into packed `Payload`s, `ErrorFeedback` and `ResidualCodec` keep the
state that makes lossy compression converge, and `ccomm.comm` moves payloads over any
torch.distributed process group while `ccomm.stats` counts the bytes.
"""
from .payload import Payload, PayloadMeta
from .registry import available_codecs, make_codec, register
from .codecs import Codec

__all__ = [
    "Payload",
    "PayloadMeta",
    "Codec",
    "make_codec",
    "available_codecs",
    "register",
]

from .feedback import ErrorFeedback
from .residual import ConsistencyError, ResidualCodec

__all__ += ["ErrorFeedback", "ResidualCodec", "ConsistencyError"]
