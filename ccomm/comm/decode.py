"""`decode_sum`: decode gathered payloads and sum them in rank order."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..payload import Payload

if TYPE_CHECKING:
    from ..codecs.base import Codec

__all__ = ["decode_sum"]


def decode_sum(codec: "Codec", payloads: Sequence[Payload]) -> torch.Tensor:
    """Decode `payloads` and sum them in the given (rank) order.

    The fixed order makes the result bit-identical on every rank. Half-precision results
    are accumulated in fp32 and cast back once, so the sum does not lose precision with
    the number of ranks.
    """
    if len(payloads) == 0:
        raise ValueError("decode_sum: payloads must hold at least one payload")
    first = codec.decode(payloads[0])
    acc_dtype = torch.promote_types(first.dtype, torch.float32)
    acc = first.to(acc_dtype, copy=True)
    for p in payloads[1:]:
        acc += codec.decode(p).to(acc_dtype)
    return acc.to(first.dtype)
