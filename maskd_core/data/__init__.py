"""Datasets by name, the train/val split and deterministic batching.

A dataset builder takes its validated argument model and the job seed and returns a
``DenseDataset``. Batching is step-indexed (see ``maskd_core.loader``): the batch of
global step k depends only on the seed and k, which is what makes a resumed run equal to an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maskd_core.data.base import DenseDataset
from maskd_core.errors import DataError, SpecError
from maskd_core.registry import Registry
from maskd_core.spec import JobSpec

DatasetBuilder = Callable[[Any, int], DenseDataset]
"""``builder(args, seed) -> DenseDataset``."""

DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def build_dataset(spec: JobSpec) -> DenseDataset:
    """The job's dataset, checked against the task; unreadable data is a ``SpecError``."""
    builder = DATASETS.get(spec.dataset.name, field="dataset.name")
    args = DATASETS.parse_args(spec.dataset.name, spec.dataset.args, field="dataset.args")
    try:
        dataset = builder(args, spec.seed)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SpecError(
            f"dataset {spec.dataset.name!r} cannot read {exc.filename or exc}: the path does not "
            "exist or is not a directory; give a directory the workers can read",
            field="dataset.args",
        ) from None
    except DataError as exc:
        raise SpecError(str(exc), field="dataset.args") from None
    if dataset.task != spec.task:
        raise SpecError(
            f"dataset {spec.dataset.name!r} holds {dataset.task} data but the job's task is "
            f"{spec.task!r}; pick a {spec.task} dataset or change the task",
            field="dataset.name",
        )
    if len(dataset) < 2:
        raise SpecError(
            f"dataset {spec.dataset.name!r} has {len(dataset)} samples; at least 2 are needed to "
            "split training and validation data",
            field="dataset.args",
        )
    return dataset


__all__ = ["DATASETS", "DatasetBuilder", "DenseDataset", "build_dataset"]

from maskd_core.data import coco as _coco  # noqa: E402,F401  (registers)
from maskd_core.data import folder as _folder  # noqa: E402,F401  (registers)
from maskd_core.data import procedural as _procedural  # noqa: E402,F401  (registers)
from maskd_core.data import procedural_boxes as _procedural_boxes  # noqa: E402,F401  (registers)
from maskd_core.data import voc as _voc  # noqa: E402,F401  (registers)
