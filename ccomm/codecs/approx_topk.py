"""`approx_topk`: top-k through a threshold estimated from a random sample (DGC-style).

Algorithm:
1. Draw s positions uniformly (seeded) and take the magnitude that 2k/n of the sample
   exceeds: a threshold expected to admit about 2k candidates.
2. One pass over the input keeps every entry at or above the threshold.
3. If at least k entries survived, run exact top-k among the candidates only, which is
   cheap because there are ~2k of them; otherwise (a rare under-estimate) fall back to
   exact top-k over the whole input.
The result is the exact top-k set whenever step 2 admits k candidates, at the cost of a
threshold pass instead of a full selection. NaN compares as "not below" the threshold,
so non-finite entries are always candidates, as in `topk`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np
import torch

from ..registry import register
from ._sparse import Sparsifier
from ..validate import check_int, check_ratio

__all__ = ["ApproxTopK"]

logger = logging.getLogger(__name__)

#: Inputs smaller than this are selected exactly: sampling would not save anything.
EXACT_BELOW = 1 << 15
#: Expected number of sample points above the threshold; sets the estimate's accuracy.
SAMPLE_HITS = 512


def _at_or_above(flat: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Positions with |x| >= thr, NaN included ("not below" rather than "at or above")."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float16):
        # numpy's abs/compare/flatnonzero run about twice as fast as torch's here.
        a = flat.detach().numpy()
        return torch.from_numpy(np.flatnonzero(~(np.abs(a) < a.dtype.type(thr.item()))))
    return torch.nonzero(~(flat.abs() < thr)).squeeze(1)


@register("approx_topk")
class ApproxTopK(Sparsifier):
    def __init__(self, ratio: float = 0.01, seed: int = 0) -> None:
        super().__init__(check_ratio("approx_topk.ratio", ratio))
        self.seed = check_int("approx_topk.seed", seed, 0)
        self._gen = torch.Generator().manual_seed(self.seed)
        self.fallbacks = 0

    def params(self) -> Mapping[str, Any]:
        return {"ratio": self.ratio, "seed": self.seed}

    def select(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Mapping[str, Any]]:
        n = flat.numel()
        k = self.k_for(n)
        s = min(n, max(4096, math.ceil(SAMPLE_HITS / (2 * self.ratio))))
        if n < EXACT_BELOW or 4 * k >= n or 2 * s >= n:
            idx = torch.topk(flat.abs(), k, sorted=False).indices
            return flat[idx], idx, {}
        pos = torch.randint(n, (s,), generator=self._gen).to(flat.device)
        sample = flat[pos].abs().float()
        hits = min(s, math.ceil(2 * k * s / n))
        thr = torch.kthvalue(sample, s - hits + 1).values.to(flat.dtype)
        cand = _at_or_above(flat, thr)
        if cand.numel() >= k:
            sub = torch.topk(flat[cand].abs(), k, sorted=False).indices
            idx = cand[sub]
        else:
            self.fallbacks += 1
            logger.debug("approx_topk: %d candidates < k=%d, exact fallback", cand.numel(), k)
            idx = torch.topk(flat.abs(), k, sorted=False).indices
        return flat[idx], idx, {}
