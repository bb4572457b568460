"""Refuse a job spec that cannot run, before anything is queued or trained.

``validate_job`` resolves every name through the registries, builds the dataset and both models
on the CPU, loads the weights and runs one real sample through teacher and student with the
taps attached. That dry run is what finds each distilled level's (C, H, W), so channel counts,
level counts and layer names are checked from the models themselves rather than declared in the
spec. Every failure is a ``SpecError`` whose ``field`` points at the part of the spec to fix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from maskd_core.data import DATASETS, DenseDataset, build_dataset
from maskd_core.errors import DataError, SpecError
from maskd_core.methods import METHODS
from maskd_core.models import MODELS, build_model
from maskd_core.paths import InputPath, args_input_paths, check_plain_path, resolve_path
from maskd_core.plan import JobPlan, LevelPlan, Shape
from maskd_core.spec import JobSpec
from maskd_core.taps import Taps
from maskd_core.tasks import Task, build_task


def _check_mixed_precision(spec: JobSpec) -> None:
    if spec.mixed_precision != "no" and spec.device == "cpu":
        raise SpecError(
            f"mixed_precision {spec.mixed_precision!r} runs on CUDA only; use mixed_precision "
            "'no' with device 'cpu', or device 'cuda'/'auto' on a GPU worker",
            field="mixed_precision",
        )


def _check_layer_lists(spec: JobSpec) -> None:
    seen: dict[str, int] = {}
    for index, name in enumerate(spec.teacher.layers):
        if name in seen:
            raise SpecError(
                f"teacher layer {name!r} is listed twice (positions {seen[name]} and {index}); "
                "tap each teacher layer once",
                field=f"teacher.layers[{index}]",
            )
        seen[name] = index


def _check_methods(spec: JobSpec) -> None:
    """Every method the job runs: ``stage2.method``, or each entry of ``comparison.methods``."""
    if spec.comparison is None:
        _check_method(spec, "stage2.method")
        return
    for index, method in enumerate(spec.comparison.methods):
        _check_method(spec.run_spec(method, spec.seed), f"comparison.methods[{index}]")


def _check_method(spec: JobSpec, field: str) -> None:
    """The method's name and params through its registry entry; ``field`` is where the method
    sits in the submitted spec, so errors point there."""
    method = spec.stage2.method
    METHODS.entry(method.name, field=f"{field}.name")
    METHODS.parse_args(method.name, method.params, field=f"{field}.params")


def _level_shapes(
    task: Task, model: nn.Module, batch: Any, layers: list[str], field: str
) -> list[list[Shape]]:
    """Per tapped layer, the (C, H, W) of each level in one no-grad eval forward."""
    model.eval()
    with Taps(model, layers, field=field) as taps, torch.no_grad():
        try:
            task.forward(model, batch)
        except TypeError as exc:  # a tapped output that is not tensors
            raise SpecError(str(exc), field=field) from None
        except RuntimeError as exc:
            raise SpecError(
                f"the model failed on a sample of the dataset: {str(exc).splitlines()[0][:300]}; "
                "check the model's args and the dataset",
                field=field.rsplit(".", 1)[0],
            ) from None
        shapes = []
        for index in range(len(layers)):
            try:
                levels = taps.layer_levels(index)
            except RuntimeError as exc:
                raise SpecError(str(exc), field=f"{field}[{index}]") from None
            for level in levels:
                if level.dim() != 4:
                    raise SpecError(
                        f"layer {layers[index]!r} outputs a tensor of shape "
                        f"{tuple(level.shape)}; MasKD distils [N,C,H,W] feature maps, so tap a "
                        "convolutional layer",
                        field=f"{field}[{index}]",
                    )
            shapes.append([(lv.shape[1], lv.shape[2], lv.shape[3]) for lv in levels])
    return shapes


def input_paths(spec: JobSpec) -> list[InputPath]:
    """Every local file or folder the job would read, resolved, without opening any.

    A service checks each one against its input policy before ``validate_job``: validation
    itself opens them, and its errors would otherwise tell a tenant which files exist elsewhere
    on the worker. Roots (weights, ``LocalPath`` arguments) come first, then sub-paths
    (``SubPathOf`` arguments), each resolved under its resolved root with symbolic links
    followed; ``InputPath.escapes_root`` says whether one leads out of its root. Registry URIs
    (``models:/…``) are not local.
    """
    found: list[InputPath] = []
    for role, model in (("teacher", spec.teacher), ("student", spec.student)):
        if model.weights is not None and not model.weights.startswith("models:/"):
            field = f"{role}.weights"
            check_plain_path(model.weights, field)
            found.append(InputPath(field, model.weights, resolve_path(model.weights, field)))
        MODELS.entry(model.arch, field=f"{role}.arch")  # an unknown name is not the args' fault
        args = MODELS.parse_args(model.arch, model.args, field=f"{role}.args")
        found.extend(args_input_paths(args, f"{role}.args"))
    DATASETS.entry(spec.dataset.name, field="dataset.name")
    args = DATASETS.parse_args(spec.dataset.name, spec.dataset.args, field="dataset.args")
    found.extend(args_input_paths(args, "dataset.args"))
    roots = [item for item in found if item.root is None]
    return [*roots, *(item for item in found if item.root is not None)]


def validate_job(
    spec: JobSpec, *, dataset: DenseDataset | None = None, teacher: nn.Module | None = None
) -> JobPlan:
    """Check everything about ``spec`` that can fail before training and describe its levels.

    A job passes the dataset and teacher it has already built (on the CPU), so it builds each
    once; the API passes neither.
    """
    _check_mixed_precision(spec)
    _check_layer_lists(spec)
    _check_methods(spec)
    task = build_task(spec)
    own_dataset = dataset is None
    dataset = build_dataset(spec) if dataset is None else dataset
    MODELS.entry(spec.teacher.arch, field="teacher.arch")  # before build_model blames the args
    MODELS.entry(spec.student.arch, field="student.arch")
    if teacher is None:
        teacher = build_model(spec.teacher, dataset.num_classes, field="teacher")
    student = build_model(spec.student, dataset.num_classes, field="student")
    try:
        sample = dataset[0]
    except DataError as exc:
        if not own_dataset:  # a running job: a failure of kind ``user``, naming the file
            raise
        # Submission: an unreadable first sample is a 422 the submitter can fix.
        raise SpecError(str(exc), field="dataset.args") from None
    batch = task.collate([sample])
    teacher_shapes = _level_shapes(task, teacher, batch, spec.teacher.layers, "teacher.layers")
    student_shapes = _level_shapes(task, student, batch, spec.student.layers, "student.layers")
    levels = []
    for pair, (t_name, s_name) in enumerate(
        zip(spec.teacher.layers, spec.student.layers, strict=True)
    ):
        t_levels, s_levels = teacher_shapes[pair], student_shapes[pair]
        if len(t_levels) != len(s_levels):
            raise SpecError(
                f"teacher layer {t_name!r} gives {len(t_levels)} levels but student layer "
                f"{s_name!r} gives {len(s_levels)}; paired layers must output the same number "
                "of tensors",
                field=f"student.layers[{pair}]",
            )
        for level, (t_shape, s_shape) in enumerate(zip(t_levels, s_levels, strict=True)):
            if spec.stage2.align == "identity" and t_shape[0] != s_shape[0]:
                raise SpecError(
                    f"stage2.align 'identity' needs equal channels, but level {level} of teacher "
                    f"layer {t_name!r} has {t_shape[0]} and student layer {s_name!r} has "
                    f"{s_shape[0]}; use align 'conv1x1' or tap layers with equal channels",
                    field="stage2.align",
                )
            levels.append(LevelPlan(pair, t_name, s_name, level, t_shape, s_shape))
    return JobPlan(num_classes=dataset.num_classes, levels=levels)
