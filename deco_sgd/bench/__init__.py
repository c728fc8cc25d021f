"""The DeCo-SGD time-to-accuracy benchmark: tasks (`mnist`, `bytelm`), the virtual clock
(`vclock`), the scenario config, the method table, the runner and the report
(docs/design/deco_sgd.md#benchmark)."""
from .bytelm import ByteLMConfig, ByteLMTask
from .mnist import MnistConfig, MnistTask
from .tasks import TASKS, Batch, Task, make_task
from .vclock import LinkTimeline, StepClock, pattern_cost, replay

__all__ = ["Task", "Batch", "TASKS", "make_task", "MnistConfig", "MnistTask", "ByteLMConfig", "ByteLMTask",
           "LinkTimeline", "StepClock", "pattern_cost", "replay"]
