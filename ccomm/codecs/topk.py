"""`topk`: keep the k = ceil(ratio * n) entries of largest magnitude (exact).

Top-k is a delta-contraction: ||C(x) - x||^2 <= (1 - k/n) ||x||^2, the property error
feedback needs. NaN and +-inf rank above every finite magnitude, so they are always sent
first and survive the round trip (if there are more than k of them, every sent value is
non-finite).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..registry import register
from ._sparse import Sparsifier
from ..validate import check_ratio

__all__ = ["TopK"]


@register("topk")
class TopK(Sparsifier):
    def __init__(self, ratio: float = 0.01) -> None:
        super().__init__(check_ratio("topk.ratio", ratio))

    def select(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Mapping[str, Any]]:
        k = self.k_for(flat.numel())
        if k == flat.numel():
            idx = torch.arange(k, device=flat.device)
        else:
            idx = torch.topk(flat.abs(), k, sorted=False).indices
        return flat[idx], idx, {}
