"""Datasets by name: the training dataset and the validation dataset a job reads.

A dataset builder takes its validated argument model and the job seed and returns a
``DenseDataset``. Batching is step-indexed (see ``maskd_core.loader``): the batch of
global step k depends only on the seed and k, which is what makes a resumed run equal to an
uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Protocol

from maskd_core.data.base import DenseDataset
from maskd_core.errors import DataError, SpecError
from maskd_core.registry import Registry
from maskd_core.seeding import derive_seed
from maskd_core.spec import DataSourceSpec, JobSpec

DEFAULT_PREFIX = "dataset.args"
"""Where a dataset's arguments sit in a spec unless its builder is told otherwise."""


class DatasetBuilder(Protocol):
    """``builder(args, seed, prefix=...) -> DenseDataset``.

    ``prefix`` is where ``args`` sit in the spec (``dataset.args``, ``val_dataset.args``), so
    that errors about an argument name the field the user wrote.
    """

    def __call__(self, args: Any, seed: int, *, prefix: str = DEFAULT_PREFIX) -> DenseDataset: ...


DATASETS: Registry[DatasetBuilder] = Registry("dataset")

_VAL_STREAM = 3
"""First seed part of a validation dataset's seed, so a generated validation dataset never
repeats the training dataset's samples (both would otherwise draw sample i from (seed, i))."""


def _build(source: DataSourceSpec, task: str, seed: int, where: str) -> DenseDataset:
    """The dataset ``source`` (found at ``where`` in the spec), checked against the task."""
    builder = DATASETS.get(source.name, field=f"{where}.name")
    args = DATASETS.parse_args(source.name, source.args, field=f"{where}.args")
    try:
        dataset = builder(args, seed, prefix=f"{where}.args")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SpecError(
            f"{where} {source.name!r} cannot read {exc.filename or exc}: the path does not "
            "exist or is not a directory; give a directory the workers can read",
            field=f"{where}.args",
        ) from None
    except DataError as exc:
        raise SpecError(str(exc), field=f"{where}.args") from None
    if dataset.task != task:
        raise SpecError(
            f"{where} {source.name!r} holds {dataset.task} data but the job's task is "
            f"{task!r}; pick a {task} dataset or change the task",
            field=f"{where}.name",
        )
    return dataset


def build_dataset(spec: JobSpec) -> DenseDataset:
    """The job's training dataset, checked against the task; unreadable data is a
    ``SpecError``. Without ``val_dataset`` it must hold enough samples to split off a
    validation part (``maskd_core.loader.train_val_split``)."""
    dataset = _build(spec.dataset, spec.task, spec.seed, "dataset")
    needed = 1 if spec.val_dataset is not None else 2
    if len(dataset) < needed:
        purpose = "to train on" if needed == 1 else "to split training and validation data"
        raise SpecError(
            f"dataset {spec.dataset.name!r} has {len(dataset)} samples; at least {needed} are "
            f"needed {purpose}",
            field="dataset.args",
        )
    return dataset


def build_val_dataset(spec: JobSpec, train: DenseDataset) -> DenseDataset:
    """The job's ``val_dataset``, checked to score what ``train`` teaches: the same task and
    the same classes (count, and names where both datasets name them)."""
    if spec.val_dataset is None:
        raise ValueError("the job has no val_dataset; split the training dataset instead")
    seed = derive_seed(_VAL_STREAM, spec.seed)
    val = _build(spec.val_dataset, spec.task, seed, "val_dataset")
    if len(val) == 0:
        raise SpecError(
            f"val_dataset {spec.val_dataset.name!r} holds no samples; point its args at the "
            "validation split's files",
            field="val_dataset.args",
        )
    check_same_classes(train, val)
    return val


def check_same_classes(train: DenseDataset, val: DenseDataset) -> None:
    """A ``SpecError`` (on ``val_dataset.args``) when ``val`` numbers its classes otherwise
    than ``train``: its scores would then compare a prediction of one class with the label
    of another."""
    how = (
        "give val_dataset the same classes as dataset (the same class list, category list or "
        "num_classes in its args)"
    )
    if val.num_classes != train.num_classes:
        raise SpecError(
            f"val_dataset has {val.num_classes} classes but dataset has {train.num_classes}; "
            + how,
            field="val_dataset.args",
        )
    if train.class_names is None or val.class_names is None:
        return
    differ = [
        index
        for index in sorted(set(train.class_names) | set(val.class_names))
        if train.class_names.get(index) != val.class_names.get(index)
    ]
    if differ:
        shown = "; ".join(
            f"class {index} is {val.class_names.get(index)!r} in val_dataset and "
            f"{train.class_names.get(index)!r} in dataset"
            for index in differ[:3]
        )
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        raise SpecError(f"{shown}{more}; {how}", field="val_dataset.args")


__all__ = [
    "DATASETS",
    "DatasetBuilder",
    "DenseDataset",
    "build_dataset",
    "build_val_dataset",
    "check_same_classes",
]

from maskd_core.data import coco as _coco  # noqa: E402,F401  (registers)
from maskd_core.data import folder as _folder  # noqa: E402,F401  (registers)
from maskd_core.data import procedural as _procedural  # noqa: E402,F401  (registers)
from maskd_core.data import procedural_boxes as _procedural_boxes  # noqa: E402,F401  (registers)
from maskd_core.data import voc as _voc  # noqa: E402,F401  (registers)
