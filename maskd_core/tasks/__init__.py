"""Tasks by name: ``TASKS.get(spec.task)()`` gives the task object."""

from maskd_core.registry import Registry
from maskd_core.spec import JobSpec
from maskd_core.tasks.base import Batch, Task

TASKS: Registry[type[Task]] = Registry("task")


def build_task(spec: JobSpec) -> Task:
    return TASKS.get(spec.task, field="task")()


__all__ = ["TASKS", "Batch", "Task", "build_task"]

from maskd_core.tasks import detection as _detection  # noqa: E402,F401  (registers)
from maskd_core.tasks import segmentation as _segmentation  # noqa: E402,F401  (registers)
