"""The `Task` protocol the time-to-accuracy benchmark drives, and the task registry (docs/design/deco_sgd.md#tasks).

A task owns its data, its model factory, its loss and its metric. Everything is a pure
function of the seed: the same `(rank, world, seed)` gives the same batches and the same
`model(seed)` gives the same initial weights, so virtual-time reruns are reproducible.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from .bytelm import ByteLMConfig, ByteLMTask
from .mnist import MnistConfig, MnistTask

__all__ = ["Task", "Batch", "TASKS", "make_task"]


#: One training batch: (inputs, targets), already on the task's device.
Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    """What the benchmark runner needs from a task."""

    name: str
    #: True when a larger `evaluate()` value is better (accuracy), False for losses (bits per byte).
    higher_is_better: bool
    device: torch.device

    def model(self, seed: int = 0) -> nn.Module:
        """A freshly initialised model on the task's device, deterministic in `seed`."""
        ...

    def batches(self, rank: int, world: int, seed: int) -> Iterator[Batch]:
        """An endless iterator over this rank's shard; shards are disjoint across ranks."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss of `model` on `batch`."""
        ...

    def evaluate(self, model: nn.Module) -> float:
        """The task metric on its held-out split."""
        ...

    def env(self) -> dict[str, Any]:
        """Facts about the data to record in results.json (e.g. corpus hash)."""
        ...


#: Task name -> (config class, task class).
TASKS: dict[str, tuple[type, Callable[..., Task]]] = {
    "mnist": (MnistConfig, MnistTask),
    "bytelm": (ByteLMConfig, ByteLMTask),
}


def make_task(name: str, device: str | torch.device = "cpu", **config: Any) -> Task:
    """Build task `name` with a config made from keyword arguments (validated by the config)."""
    if name not in TASKS:
        raise ValueError(f"task: must be one of {sorted(TASKS)}, got {name!r}")
    config_cls, task_cls = TASKS[name]
    return task_cls(config_cls(**config), device=device)
