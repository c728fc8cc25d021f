"""Helpers shared by the benchmark tasks: seeded model construction (range checks are
`ccomm.validate`'s)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

import torch

__all__ = ["seeded", "build_seeded"]


M = TypeVar("M")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore it afterwards.

    Module constructors draw their initial weights from the global RNG; forking it keeps
    model construction deterministic without disturbing the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_seeded(factory: Callable[[], M], seed: int) -> M:
    """Call `factory` with torch's RNG seeded to `seed` (caller's RNG state untouched)."""
    with seeded(seed):
        return factory()
