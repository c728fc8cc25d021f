"""`randomk`: send k = ceil(ratio * n) entries at seeded random positions.

Ranks that share `seed` and call `encode` in the same order draw the same positions, so
positions are never sent and payloads can be summed: the codec is additive.

Positions (`sampling`):
- `strata` (default, O(k)): split [0, n) into k near-equal strata and draw one position
  uniformly inside each. Every entry is kept with probability 1/|stratum| ~= k/n.
- `uniform` (O(n)): a uniformly random k-subset (`randperm`).
With `unbiased=true` (default) kept values are scaled by the inverse keep probability, so
E[decode(encode(x))] = x. With `unbiased=false` values are sent as they are, which makes
the codec a contraction in expectation (what error feedback wants).
Non-finite inputs: a random subset could miss them, so any non-finite entry turns every
sent value into NaN (one extra reduction) rather than vanish silently.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch

from ..registry import register
from ._sparse import Sparsifier
from ..validate import check_bool, check_choice, check_int, check_ratio

__all__ = ["RandomK"]


def _call_seed(seed: int, counter: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{counter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@register("randomk")
class RandomK(Sparsifier):
    additive = True
    sends_indices = False

    def __init__(self, ratio: float = 0.01, seed: int = 0, unbiased: bool = True, sampling: str = "strata") -> None:
        super().__init__(check_ratio("randomk.ratio", ratio))
        self.seed = check_int("randomk.seed", seed, 0)
        self.unbiased = check_bool("randomk.unbiased", unbiased)
        self.sampling = check_choice("randomk.sampling", sampling, ("strata", "uniform"))
        #: Number of selections so far; every rank must keep it equal (it seeds the next draw).
        self.counter = 0
        self._last_seed = _call_seed(self.seed, 0)

    def params(self) -> Mapping[str, Any]:
        return {"ratio": self.ratio, "seed": self.seed, "unbiased": self.unbiased, "sampling": self.sampling}

    def _extra_for_receiver(self) -> Mapping[str, Any]:
        # A receiver decodes with the seed of the rank's own latest draw (same step, same seed).
        return {"seed": self._last_seed}

    def _draw(self, n: int, k: int, call_seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and the inverse keep probability of each (drawn on CPU: identical on every device)."""
        gen = torch.Generator().manual_seed(call_seed)
        if self.sampling == "uniform":
            idx = torch.randperm(n, generator=gen)[:k]
            weight = torch.full((k,), n / k, dtype=torch.float64)
        else:
            bounds = torch.div(torch.arange(k + 1, dtype=torch.int64) * n, k, rounding_mode="floor")
            size = bounds[1:] - bounds[:-1]
            idx = bounds[:-1] + (torch.rand(k, generator=gen, dtype=torch.float64) * size).long()
            weight = size.double()
        return idx.to(device), weight.to(device)

    def select(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Mapping[str, Any]]:
        n = flat.numel()
        k = self.k_for(n)
        call_seed = _call_seed(self.seed, self.counter)
        self.counter += 1
        self._last_seed = call_seed
        idx, weight = self._draw(n, k, call_seed, flat.device)
        values = flat[idx]
        if self.unbiased:
            values = (values.double() * weight).to(flat.dtype)
        # Sync-free poisoning: adds 0 when the input is finite, NaN otherwise.
        poison = torch.where(torch.isfinite(flat).all(), 0.0, float("nan")).to(flat.dtype)
        return values + poison, None, {"seed": call_seed}

    def positions(self, n: int, k: int, extra: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        if k != self.k_for(n):
            raise ValueError(f"randomk: payload holds {k} values, expected {self.k_for(n)} for n={n}")
        return self._draw(n, k, int(extra["seed"]), device)[0]
