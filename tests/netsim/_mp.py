"""`LazyRanks(n)`: a shared `ccomm.ranks.RankPool` for the emulate tests, restarted on demand.

Spawning ranks and importing torch costs seconds on two busy cores, so the tests share one
pool per size. The pool starts on first use and again after a failure closed it, so one
failing test does not fail every later test that shares it.
"""
from __future__ import annotations

from typing import Any, Callable

from ccomm.ranks import RankPool

__all__ = ["LazyRanks"]


class LazyRanks:
    def __init__(self, n: int) -> None:
        self.n = n
        self._pool: RankPool | None = None
        self._used = False

    def start(self) -> None:
        """Have live ranks (spawning them now, e.g. outside a timed window)."""
        if self._pool is None or self._pool.broken:
            self._pool = RankPool(self.n, group_timeout_s=60.0, name="netsim-emu")
            self._used = False

    def fresh(self) -> None:
        """Have live ranks that have run no job yet."""
        if self._used:
            self.close()
        self.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0) -> list[Any]:
        """`fn(rank, n, *args)` on every rank; results in rank order."""
        self.start()
        assert self._pool is not None
        self._used = True
        return self._pool.run(fn, *args, timeout=timeout_s)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
