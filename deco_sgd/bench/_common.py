"""Helpers shared by the benchmark tasks: float range checks (integers use ccomm's
`check_int`) and seeded model construction."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

import torch

__all__ = ["check_float", "seeded", "build_seeded"]


M = TypeVar("M")


def check_float(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise `ValueError` naming `name` unless `value` is a real number in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: must be a number in {rng}, got {value!r}")


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
