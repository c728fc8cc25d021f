"""Virtual elapsed time of a recorded step schedule (the §9.3 rule, on netsim's cost model).

Stand-in until the benchmark's shared virtual clock is used here. Per step s, with
compute time T_s:

1. launch = start_s + T_s; each unit of the step is charged in launch order:
   tx_start = max(launch, link_free), done = tx_start + (collective time from tx_start,
   latency included), link_free = done − L_eff (ring: (n−1)ℓ all-gather, 2(n−1)ℓ all-reduce);
2. the step ends (and step s+1 starts) at max(launch, done of every entry it applied).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from netsim import Link
from netsim.cost import collective_time

__all__ = ["UnitPlan", "StepPlan", "virtual_step_ends"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitPlan:
    """One collective of a step: `allreduce` (S = buffer bytes) or `allgather` (S = own block)."""

    collective: str
    nbytes: int


@dataclass(frozen=True)
class StepPlan:
    step: int
    compute_s: float
    units: tuple[UnitPlan, ...]
    #: Steps whose aggregates this step waits for and applies.
    applied: tuple[int, ...]


def _l_eff(collective: str, link: Link, n: int) -> float:
    hops = 2 * (n - 1) if collective == "allreduce" else n - 1
    return hops * link.latency_s


def virtual_step_ends(plans: Sequence[StepPlan], link: Link, n: int, start_s: float = 0.0) -> list[float]:
    """Elapsed time (from `start_s`, the trace time of the first step) at the end of each step."""
    t = start_s
    link_free = start_s
    done: dict[int, float] = {}
    ends = []
    for p in plans:
        launch = t + p.compute_s
        for u in p.units:
            tx = max(launch, link_free)
            d = tx + collective_time(u.collective, u.nbytes, link, n, start_s=tx)
            link_free = d - _l_eff(u.collective, link, n)
            done[p.step] = max(done.get(p.step, d), d)
        t = max([launch] + [done[a] for a in p.applied])
        ends.append(t - start_s)
    return ends
