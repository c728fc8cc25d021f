"""What every method's per-rank training loop shares: the rank's context and the run record.

Every method trains the same task from the same initial weights on the same data shards
with the same optimiser (SGD, the scenario's learning rate and momentum), evaluates on rank
0 at the same steps, and returns the same record (`run_record`), which rank 0 writes to the
run cache and the runner re-times from its step log (`vclock.replay`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import BenchConfig
from .plan import RunSpec
from .vclock import LinkTimeline, StepClock

__all__ = ["RankContext", "make_sgd", "evaluate", "eval_due", "run_record"]


@dataclass
class RankContext:
    """What one rank needs to run methods: its place, the task and the scenario."""

    rank: int
    world: int
    cfg: BenchConfig
    task: Any
    progress: Callable[[int], None] = lambda k: None
    #: seed -> (ratio, staleness, value format) of DeCo's first decision, for static_apriori.
    apriori: dict[int, tuple[float, int, str]] = field(default_factory=dict)


def make_sgd(ctx: RankContext, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = ctx.cfg.train
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum)


def evaluate(ctx: RankContext, model: torch.nn.Module) -> float | None:
    return ctx.task.evaluate(model) if ctx.rank == 0 else None


def eval_due(ctx: RankContext, step: int) -> bool:
    t = ctx.cfg.train
    return step % t.eval_every == 0 or step == t.steps


def run_record(spec: RunSpec, curve: list[dict[str, Any]], clock: StepClock, tl: LinkTimeline, wall: float,
               params: dict[str, Any], steps_log: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The run record rank 0 writes; `steps_log` lets the runner re-time it (`vclock.replay`)."""
    return {"name": spec.name, "kind": spec.kind, "seed": spec.seed, "params": params, "curve": curve,
            "final_metric": curve[-1]["metric"], "steps": clock.steps, "virtual_time_s": clock.start,
            "blocked_s": clock.blocked, "bytes_received_per_worker": tl.bytes_received,
            "wall_s": wall, "steps_log": steps_log, **extra}
