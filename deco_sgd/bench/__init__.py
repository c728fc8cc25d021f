"""Real-data tasks for the DeCo-SGD time-to-accuracy benchmark (design §9.1): `mnist`, `bytelm`."""
from .bytelm import ByteLMConfig, ByteLMTask
from .mnist import MnistConfig, MnistTask
from .tasks import TASKS, Batch, Task, make_task

__all__ = ["Task", "Batch", "TASKS", "make_task", "MnistConfig", "MnistTask", "ByteLMConfig", "ByteLMTask"]
