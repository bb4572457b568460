"""Refuse a job spec that cannot run, before anything is queued or trained.

``validate_job`` resolves every name through the registries, builds the dataset and both models
on the CPU, loads the weights and runs one real sample through teacher and student with the
taps attached. That dry run is what finds each distilled level's (C, H, W), so channel counts,
level counts and layer names are checked from the models themselves rather than declared in the
spec. Every failure is a ``SpecError`` whose ``field`` points at the part of the spec to fix.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from maskd_core.data import DATASETS, DenseDataset, build_dataset, build_val_dataset
from maskd_core.detection_recipe import check_detection_recipe
from maskd_core.errors import DataError, SpecError, UnknownNameError
from maskd_core.methods import METHODS, check_methods_against_plan
from maskd_core.model_probe import level_shapes, probed_level_shapes
from maskd_core.models import MODELS, with_default_layers
from maskd_core.models.detection import CLASS_LOGITS, detector_family
from maskd_core.models.segmentation import AUX_CLASSIFIER
from maskd_core.paths import InputPath, args_input_paths, check_plain_path, resolve_path
from maskd_core.plan import AuxPlan, ClassLogits, JobPlan, LevelPlan, Shape
from maskd_core.registry import DefaultTaps
from maskd_core.spec import DataSourceSpec, JobSpec, ModelSpec
from maskd_core.tasks import Task, build_task


def _check_mixed_precision(spec: JobSpec) -> None:
    if spec.mixed_precision != "no" and spec.device == "cpu":
        raise SpecError(
            f"mixed_precision {spec.mixed_precision!r} runs on CUDA only; use mixed_precision "
            "'no' with device 'cpu', or device 'cuda'/'auto' on a GPU worker",
            field="mixed_precision",
        )


def _check_layer_lists(spec: JobSpec, defaulted: tuple[str, ...]) -> None:
    """Each teacher layer once, and as many student layers as teacher layers (the spec checks
    the counts itself only when it names both lists)."""
    seen: dict[str, int] = {}
    for index, name in enumerate(spec.teacher.tapped_layers):
        if name in seen:
            raise SpecError(
                f"teacher layer {name!r} is listed twice (positions {seen[name]} and {index}); "
                "tap each teacher layer once",
                field=f"teacher.layers[{index}]",
            )
        seen[name] = index
    student = spec.student
    if student is None or len(student.tapped_layers) == len(spec.teacher.tapped_layers):
        return
    sides = [
        f"{role}.layers{_layers_source(model, role in defaulted)} has "
        f"{len(model.tapped_layers)} entries"
        for role, model in (("teacher", spec.teacher), ("student", student))
    ]
    raise SpecError(
        f"{sides[0]} and {sides[1]}; they are paired by position, so name one student layer "
        "for every teacher layer (or leave both out for the default taps)",
        field="student.layers",
    )


def _layers_source(model: ModelSpec, defaulted: bool) -> str:
    """`` (the default taps of fcos: ['backbone'])`` for layers the registry chose, else
    ``''``: what a message names beside them."""
    if not defaulted:
        return ""
    return f" (the default taps of {model.arch}: {model.tapped_layers})"


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


def input_paths(spec: JobSpec) -> list[InputPath]:
    """Every local file or folder the job would read, resolved, without opening any.

    A service checks each one against its input policy before ``validate_job``: validation
    itself opens them, and its errors would otherwise tell a tenant which files exist elsewhere
    on the worker. Roots (weights, ``LocalPath`` arguments) come first, then sub-paths
    (``SubPathOf`` arguments), each resolved under its resolved root with symbolic links
    followed; ``InputPath.escapes_root`` says whether one leads out of its root. Registry URIs
    (``models:/…``) are not local.

    The spec's fields are walked by type: every ``ModelSpec`` (teacher, student) and every
    ``DataSourceSpec`` (dataset, val_dataset) is covered, including any such field added later.
    """
    found: list[InputPath] = []
    for where, value in spec:
        if isinstance(value, ModelSpec):
            found.extend(_model_paths(value, where))
        elif isinstance(value, DataSourceSpec):
            DATASETS.entry(value.name, field=f"{where}.name")
            args = DATASETS.parse_args(value.name, value.args, field=f"{where}.args")
            found.extend(args_input_paths(args, f"{where}.args"))
    roots = [item for item in found if item.root is None]
    return [*roots, *(item for item in found if item.root is not None)]


def _model_paths(model: ModelSpec, where: str) -> list[InputPath]:
    """The local weights file and path arguments of the model at ``where`` (``teacher``)."""
    found: list[InputPath] = []
    if model.weights is not None and not model.weights.startswith("models:/"):
        field = f"{where}.weights"
        check_plain_path(model.weights, field)
        found.append(InputPath(field, model.weights, resolve_path(model.weights, field)))
    MODELS.entry(model.arch, field=f"{where}.arch")  # an unknown name is not the args' fault
    args = MODELS.parse_args(model.arch, model.args, field=f"{where}.args")
    found.extend(args_input_paths(args, f"{where}.args"))
    return found


def _first_sample(dataset: DenseDataset, where: str, *, submission: bool) -> Any:
    """Sample 0 of ``dataset`` (at ``where`` in the spec), the proof that its files read."""
    try:
        return dataset[0]
    except DataError as exc:
        if not submission:  # a running job: a failure of kind ``user``, naming the file
            raise
        # Submission: an unreadable first sample is a 422 the submitter can fix.
        raise SpecError(str(exc), field=f"{where}.args") from None


def validate_job(
    spec: JobSpec, *, dataset: DenseDataset | None = None, teacher: nn.Module | None = None
) -> JobPlan:
    """Check everything about ``spec`` that can fail before training and describe its levels.

    A job passes the dataset and teacher it has already built (on the CPU), so it builds each
    once; the API passes neither. Only without a dataset given is ``val_dataset`` built and
    checked here (its classes against the dataset's, its first sample read): a job builds it
    with its split (``maskd_core.loader.train_val_split``), which checks it the same way.
    """
    _check_mixed_precision(spec)
    defaulted = tuple(
        role
        for role, model in (("teacher", spec.teacher), ("student", spec.student))
        if model is not None and model.layers is None
    )
    spec = with_default_layers(spec)
    _check_layer_lists(spec, defaulted)
    _check_methods(spec)
    task = build_task(spec)
    own_dataset = dataset is None
    dataset = build_dataset(spec) if dataset is None else dataset
    MODELS.entry(spec.teacher.arch, field="teacher.arch")  # before build_model blames the args
    if spec.student is not None:
        MODELS.entry(spec.student.arch, field="student.arch")
    sample = _first_sample(dataset, "dataset", submission=own_dataset)
    if own_dataset and spec.val_dataset is not None:
        _first_sample(build_val_dataset(spec, dataset), "val_dataset", submission=True)
    batch = task.collate([sample])
    num_classes = dataset.num_classes
    aux_fields = _aux_fields(spec)
    teacher_shapes, teacher_aux = _shapes_with_aux(
        spec.teacher, "teacher", task, batch, num_classes, teacher, aux_fields
    )
    if spec.student is None:  # a teacher job: nothing is distilled, so no level is planned
        return JobPlan(num_classes=num_classes, levels=[])
    student_shapes, student_aux = _shapes_with_aux(
        spec.student, "student", task, batch, num_classes, None, aux_fields
    )
    check_detection_recipe(spec, num_classes)
    levels = _paired_levels(spec, teacher_shapes, student_shapes, defaulted)
    aux = None
    if teacher_aux is not None and student_aux is not None:
        aux = _aux_plan(levels, teacher_aux, student_aux, aux_fields[0])
    plan = JobPlan(
        num_classes=dataset.num_classes,
        levels=levels,
        aux=aux,
        align=spec.stage2.align,
        defaulted=defaulted,
    )
    check_methods_against_plan(spec, plan)
    return plan


NAME_THE_LAYERS = (
    "name the layers to distil in teacher.layers and student.layers (levels of equal "
    "stride; a student map of another size is resized onto the teacher's)"
)


def _paired_levels(
    spec: JobSpec,
    teacher_shapes: list[list[Shape]],
    student_shapes: list[list[Shape]],
    defaulted: tuple[str, ...],
) -> list[LevelPlan]:
    """Level j of teacher layer i against level j of student layer i, each checked: equal level
    counts, equal channels under ``identity``, sizes that resize onto each other and, when the
    registry chose either side's layers, equal strides and sizes (a default pairing resizes
    nothing: levels at other strides see other objects, and the user never chose that)."""
    teacher, student = spec.teacher, spec.distilled_student
    t_taps, s_taps = MODELS.entry(teacher.arch).taps, MODELS.entry(student.arch).taps
    levels = []
    for pair, (t_name, s_name) in enumerate(
        zip(teacher.tapped_layers, student.tapped_layers, strict=True)
    ):
        t_levels, s_levels = teacher_shapes[pair], student_shapes[pair]
        if len(t_levels) != len(s_levels):
            fix = NAME_THE_LAYERS if defaulted else "paired layers must output as many tensors"
            raise SpecError(
                f"teacher layer {t_name!r}{_layers_source(teacher, 'teacher' in defaulted)} "
                f"gives {len(t_levels)} levels but student layer {s_name!r}"
                f"{_layers_source(student, 'student' in defaulted)} gives {len(s_levels)}; "
                f"{fix}",
                field="student.layers" if defaulted else f"student.layers[{pair}]",
            )
        for level, (t_shape, s_shape) in enumerate(zip(t_levels, s_levels, strict=True)):
            where = f"level {level} of teacher layer {t_name!r} and student layer {s_name!r}"
            if spec.stage2.align == "identity" and t_shape[0] != s_shape[0]:
                raise SpecError(
                    f"stage2.align 'identity' needs equal channels, but level {level} of teacher "
                    f"layer {t_name!r} has {t_shape[0]} and student layer {s_name!r} has "
                    f"{s_shape[0]}; use align 'conv1x1' or tap layers with equal channels",
                    field="stage2.align",
                )
            t_stride = t_taps.stride_of(t_name, level) if t_taps else None
            s_stride = s_taps.stride_of(s_name, level) if s_taps else None
            if defaulted:
                _check_default_pair(spec, where, (t_shape, t_stride), (s_shape, s_stride))
            if not _lines_up(t_shape, s_shape):
                raise SpecError(
                    f"{where} cannot be lined up: the teacher's map is {_size(t_shape)} and the "
                    f"student's {_size(s_shape)}, scaled differently along height and width; "
                    "tap layers whose maps have the same aspect (for detectors, give teacher "
                    "and student the same min_size and max_size)",
                    field=f"student.layers[{pair}]",
                )
            levels.append(
                LevelPlan(
                    pair,
                    t_name,
                    s_name,
                    level,
                    t_shape,
                    s_shape,
                    t_stride,
                    s_stride,
                    _class_logits(spec, pair, t_shape[0]),
                )
            )
    return levels


def _class_logits(spec: JobSpec, pair: int, classes: int) -> ClassLogits | None:
    """The mark of the ``pair``-th layers when both are a detector's class logits (the module
    each family names, ``DetectorFamily.class_logits``); None when neither is. Logits paired
    with features, or anchors that differ, are refused: a logit row pairs anchor by anchor."""
    sides = [
        (role, model.tapped_layers[pair], detector_family(model.arch, f"{role}.arch"))
        for role, model in (("teacher", spec.teacher), ("student", spec.distilled_student))
    ]
    marked = [family is not None and family.class_logits == name for _, name, family in sides]
    if not any(marked):
        return None
    if not all(marked):
        logits, other = sides if marked[0] else sides[::-1]
        raise SpecError(
            f"{logits[0]} layer {logits[1]!r} is the detector's class logits and {other[0]} "
            f"layer {other[1]!r} is not; pair class logits with the other detector's "
            f"({CLASS_LOGITS}), or features with features",
            field=f"student.layers[{pair}]",
        )
    teacher, student = (family for _, _, family in sides)
    assert teacher is not None and student is not None  # both marked
    if teacher.anchors != student.anchors:
        raise SpecError(
            f"the teacher's class logits ({spec.teacher.arch}) have {teacher.anchors} anchors "
            f"per pixel and the student's ({spec.distilled_student.arch}) {student.anchors}; "
            "their logits pair anchor by anchor, so distil the class logits between detectors "
            "of one family, or tap features",
            field=f"student.layers[{pair}]",
        )
    return ClassLogits(classes=classes, anchors=teacher.anchors)


def _check_default_pair(
    spec: JobSpec,
    where: str,
    teacher: tuple[Shape, int | None],
    student: tuple[Shape, int | None],
) -> None:
    """A level of a pairing the registry chose: at equal strides and of equal sizes."""
    (t_shape, t_stride), (s_shape, s_stride) = teacher, student
    t_arch, s_arch = spec.teacher.arch, spec.distilled_student.arch
    if t_stride is not None and s_stride is not None and t_stride != s_stride:
        t_taps, s_taps = MODELS.entry(t_arch).taps, MODELS.entry(s_arch).taps
        assert t_taps is not None and s_taps is not None  # a stride is declared by default taps
        raise SpecError(
            f"the default taps of teacher {t_arch} and student {s_arch} do not pair: the "
            f"teacher's levels are at strides {_strides(t_taps)} and the student's at "
            f"{_strides(s_taps)}, so {where} would pair stride {t_stride} with stride "
            f"{s_stride}; {NAME_THE_LAYERS}, or pick a student of the teacher's family",
            field="student.layers",
        )
    if t_shape[1:] != s_shape[1:]:
        raise SpecError(
            f"the default taps of teacher {t_arch} and student {s_arch} do not pair: {where} "
            f"is {_size(t_shape)} on the teacher and {_size(s_shape)} on the student, as the "
            "two see the image at different sizes or strides; give both the same input size "
            f"(a detector's min_size and max_size), or {NAME_THE_LAYERS}",
            field="student.layers",
        )


def _strides(taps: DefaultTaps) -> str:
    return "; ".join(
        f"{', '.join(str(s) for s in strides)} ({layer})"
        for layer, strides in zip(taps.layers, taps.strides, strict=True)
    )


def _size(shape: Shape) -> str:
    return f"{shape[1]}x{shape[2]}"


def _lines_up(teacher: Shape, student: Shape) -> bool:
    """Whether the student's map resizes onto the teacher's without distortion: the same scale
    along both axes, up to the pixel each side loses to rounding at its stride (a 100x130
    image gives 13x17 at stride 8 and 7x9 at stride 16)."""
    (_, t_h, t_w), (_, s_h, s_w) = teacher, student
    return abs(t_h * s_w - t_w * s_h) <= max(t_h + t_w, s_h + s_w)


def _aux_fields(spec: JobSpec) -> list[str]:
    """Where the job's methods ask for the auxiliary heads' distillation (``aux_weight``)."""
    if spec.student is None:
        return []
    entries = [("stage2.method", spec.stage2.method)]
    if spec.comparison is not None:
        entries = [(f"comparison.methods[{i}]", m) for i, m in enumerate(spec.comparison.methods)]
    fields = []
    for where, method in entries:
        params = METHODS.parse_args(method.name, method.params, field=f"{where}.params")
        if getattr(params, "aux_weight", None) is not None:
            fields.append(f"{where}.params.aux_weight")
    return fields


def _shapes_with_aux(
    model: ModelSpec,
    where: str,
    task: Task,
    batch: Any,
    num_classes: int,
    built: nn.Module | None,
    aux_fields: list[str],
) -> tuple[list[list[Shape]], list[Shape] | None]:
    """The level shapes of ``model``'s layers and, when ``aux_fields`` ask for it, of its
    auxiliary head, from one forward (of ``built`` when given, else of a probe)."""
    taps = MODELS.entry(model.arch).taps
    if aux_fields and taps is not None and taps.aux is None:
        raise SpecError(
            f"aux_weight distils the auxiliary heads, and the {where} ({model.arch}) has none; "
            "remove aux_weight, or pick models with one (torchvision's segmentation models and "
            "deeplabv3_resnet18, with args aux_loss: true)",
            field=aux_fields[0],
        )
    layers = [*model.tapped_layers, *([AUX_CLASSIFIER] if aux_fields else [])]
    try:
        if built is None:
            tapped = model.model_copy(update={"layers": layers})
            shapes = probed_level_shapes(tapped, where, task, batch, num_classes)
        else:
            shapes = level_shapes(task, built, batch, layers, f"{where}.layers")
    except SpecError as exc:
        if aux_fields and exc.field == f"{where}.layers[{len(model.tapped_layers)}]":
            problem = "has no such module" if isinstance(exc, UnknownNameError) else str(exc)
            raise SpecError(
                f"aux_weight distils the auxiliary heads (module {AUX_CLASSIFIER!r}), and the "
                f"{where} ({model.arch} with these args) {problem}; build both models with one "
                "(torchvision's segmentation models and deeplabv3_resnet18: args aux_loss: "
                "true) or remove aux_weight",
                field=aux_fields[0],
            ) from None
        raise
    if not aux_fields:
        return shapes, None
    return shapes[:-1], shapes[-1]


def _aux_plan(
    levels: list[LevelPlan], teacher: list[Shape], student: list[Shape], field: str
) -> AuxPlan:
    """The aux heads' pairing: one logits tensor each, with equal channels, and the level
    whose tokens they reuse (the first teacher level with as many channels: the main logits)."""
    if len(teacher) != 1 or len(student) != 1:
        raise SpecError(
            f"aux_weight distils one logits tensor per model, but the teacher's "
            f"{AUX_CLASSIFIER!r} outputs {len(teacher)} and the student's {len(student)}",
            field=field,
        )
    (t_shape,), (s_shape,) = teacher, student
    if t_shape[0] != s_shape[0]:
        raise SpecError(
            f"the auxiliary heads cannot be compared: the teacher's has {t_shape[0]} channels "
            f"and the student's {s_shape[0]}; both must output the class logits",
            field=field,
        )
    for index, level in enumerate(levels):
        if level.teacher_channels == t_shape[0]:
            return AuxPlan(AUX_CLASSIFIER, t_shape, s_shape, tokens_level=index)
    raise SpecError(
        f"aux_weight reuses the tokens learned on the teacher's main logits, but no distilled "
        f"level has the auxiliary head's {t_shape[0]} channels; tap the teacher's classifier "
        "(the logits, e.g. 'classifier') in teacher.layers",
        field=field,
    )
