"""Tasks by name: ``TASKS.get(spec.task)()`` gives the task object."""

from maskd_core.registry import Registry
from maskd_core.tasks.base import Batch, Task

TASKS: Registry[type[Task]] = Registry("task")

__all__ = ["TASKS", "Batch", "Task"]

from maskd_core.tasks import detection as _detection  # noqa: E402,F401  (registers)
from maskd_core.tasks import segmentation as _segmentation  # noqa: E402,F401  (registers)
