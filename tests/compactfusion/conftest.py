"""Fixtures of the CompactFusion tests: `cf_pool(n)`, a live n-rank gloo pool per module."""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _harness import RankPool  # noqa: E402


@pytest.fixture(scope="module")
def cf_pool() -> Iterator[Callable[[int], RankPool]]:
    """`cf_pool(n)`: an n-rank pool shared by the module, restarted after a failure."""
    pools: dict[int, RankPool] = {}

    def get(n: int) -> RankPool:
        p = pools.get(n)
        if p is None or p.broken:
            # Generous start timeout: spawning ranks that import torch + diffusers on 2 shared
            # cores has taken ~100 s under heavy load.
            p = pools[n] = RankPool(n, group_timeout_s=60.0, start_timeout_s=300.0)
        return p

    yield get
    for p in pools.values():
        p.close()
