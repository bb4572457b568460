"""The official detection recipe's parts beside MasKD: teacher-weight inheriting and head KD.

The published RetinaNet numbers of MasKD come from configs that do two things the paper's loss
does not (../shared docs ``maskd-method.md`` §2.2): the student's neck and head start from the
teacher's ("inheriting"), and the box-regression head's outputs are distilled too. Both are
stage-2 options (``stage2.inherit_teacher_weights``, ``stage2.head_regression``), off unless a
spec asks, so "MasKD on features" and "MasKD + inherit + head KD" stay separate results.

Both work on the parts a detector family names (``maskd_core.models.detection``): what the neck
and head subtrees are, and which module regresses the boxes. Nothing here is specific to one
family beyond those names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from maskd_core.errors import SpecError
from maskd_core.models import MODELS
from maskd_core.models.detection import (
    DetectorArgs,
    DetectorFamily,
    detector_family,
    run_through_head,
    state_shapes,
)
from maskd_core.spec import HeadRegressionSpec, JobSpec
from maskd_core.taps import Taps
from maskd_core.tasks.detection import DetectionBatch

logger = logging.getLogger(__name__)

INHERIT_FIELD = "stage2.inherit_teacher_weights"
HEAD_FIELD = "stage2.head_regression"


@dataclass(frozen=True)
class Inherited:
    """What a student took from its teacher: ``tensors`` state-dict entries holding
    ``parameters`` numbers, and the entries of its neck and head it kept as built (no teacher
    entry of that name and shape), ``kept``."""

    subtrees: tuple[str, ...]
    tensors: int
    parameters: int
    kept: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "subtrees": list(self.subtrees),
            "tensors": self.tensors,
            "parameters": self.parameters,
            "kept_as_built": list(self.kept),
        }


def _under(name: str, subtrees: Sequence[str]) -> bool:
    return any(name == root or name.startswith(f"{root}.") for root in subtrees)


def inheritable(
    teacher: Mapping[str, Sequence[int]],
    student: Mapping[str, Sequence[int]],
    subtrees: Sequence[str],
) -> tuple[list[str], list[str]]:
    """The student's entries under ``subtrees`` that the teacher has with the same name and
    shape, and those it has not (kept as built), from both models' entry shapes."""
    matched: list[str] = []
    kept: list[str] = []
    for name, shape in student.items():
        if not _under(name, subtrees):
            continue
        same = name in teacher and tuple(teacher[name]) == tuple(shape)
        (matched if same else kept).append(name)
    return matched, kept


def inherit_teacher_weights(
    teacher: nn.Module, student: nn.Module, family: DetectorFamily
) -> Inherited:
    """Copy into ``student`` every entry of the teacher's neck and head (``family.inherited``)
    whose name and shape the student has; buffers too, so a head's statistics travel with it."""
    own = student.state_dict()
    theirs = teacher.state_dict()
    matched, kept = inheritable(
        {k: v.shape for k, v in theirs.items()},
        {k: v.shape for k, v in own.items()},
        family.inherited,
    )
    with torch.no_grad():
        for name in matched:
            own[name].copy_(theirs[name])
    return Inherited(
        family.inherited, len(matched), sum(own[name].numel() for name in matched), tuple(kept)
    )


def head_regression_loss(
    students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], spec: HeadRegressionSpec
) -> torch.Tensor:
    """Σ_levels mean over N·(A·4)·H·W of loss(student − teacher), unweighted, in fp32.

    One term per FPN level, each a mean, as the official config's per-level loss on
    ``retina_reg``; the levels then add with equal weight, as MasKD's do.
    """
    if len(students) != len(teachers) or not students:
        raise RuntimeError(
            f"the box-regression head ran {len(students)} times on the student and "
            f"{len(teachers)} on the teacher; both must run once per FPN level"
        )
    terms = []
    for student, teacher in zip(students, teachers, strict=True):
        s, t = student.float(), teacher.float()
        if spec.loss == "l1":
            terms.append(F.l1_loss(s, t))
        elif spec.loss == "smooth_l1":
            terms.append(F.smooth_l1_loss(s, t, beta=spec.beta))
        else:
            terms.append(F.mse_loss(s, t))
    return torch.stack(terms).sum()


class HeadDistillation:
    """Head-level regression KD in stage 2: taps on both models' box-regression module, the
    teacher's forward through its head, and the loss of what the taps caught.

    Use ``taps`` as context managers for the stage; per step, ``teacher_forward`` (under
    ``no_grad``) and the student's training forward, then ``loss``, which also clears the taps.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        family: DetectorFamily,
        spec: HeadRegressionSpec,
    ) -> None:
        if family.box_regression is None:
            raise ValueError(f"{family.name} detectors have no per-level box regression to tap")
        self.spec = spec
        self.weight = spec.weight
        self.teacher_taps = Taps(teacher, [family.box_regression], field=HEAD_FIELD, per_call=True)
        self.student_taps = Taps(student, [family.box_regression], field=HEAD_FIELD, per_call=True)

    @property
    def taps(self) -> tuple[Taps, Taps]:
        return self.teacher_taps, self.student_taps

    def teacher_forward(self, teacher: nn.Module, batch: DetectionBatch) -> None:
        """The teacher through its head, which also runs the FPN the method's taps read."""
        run_through_head(teacher, batch.images)

    def loss(self) -> torch.Tensor:
        try:
            return head_regression_loss(
                self.student_taps.layer_levels(0), self.teacher_taps.layer_levels(0), self.spec
            )
        finally:
            self.teacher_taps.clear()
            self.student_taps.clear()


def detection_recipe(
    spec: JobSpec, teacher: nn.Module, student: nn.Module
) -> tuple[Inherited | None, HeadDistillation | None]:
    """What ``spec.stage2`` asks beside the method: the student inherits from the teacher now
    (before stage 2 trains or resumes it: a checkpoint then overwrites it), and the head KD
    for the stage to run. (None, None) when it asks for neither."""
    stage2 = spec.stage2
    if not stage2.inherit_teacher_weights and stage2.head_regression is None:
        return None, None
    family = detector_family(spec.distilled_student.arch, "student.arch")
    if family is None:  # validation refuses it: check_detection_recipe
        raise SpecError(
            "inherit_teacher_weights and head_regression apply to detectors only",
            field=INHERIT_FIELD if stage2.inherit_teacher_weights else HEAD_FIELD,
        )
    inherited = None
    if stage2.inherit_teacher_weights:
        inherited = inherit_teacher_weights(teacher, student, family)
        logger.info(
            "the student inherits %d tensors (%d parameters) of the teacher's %s; %d kept as built",
            inherited.tensors,
            inherited.parameters,
            ", ".join(inherited.subtrees),
            len(inherited.kept),
        )
    head = None
    if stage2.head_regression is not None:
        head = HeadDistillation(teacher, student, family, stage2.head_regression)
    return inherited, head


def check_detection_recipe(spec: JobSpec, num_classes: int) -> None:
    """Refuse inheriting or head KD that cannot do what it says, naming the field to fix.

    Both need a teacher and student of one detector family; inheriting needs at least one
    neck or head tensor of equal name and shape (from the models' structure, built on the meta
    device: no weights are read); head KD needs a one-stage family and both models resizing
    images alike, so their head outputs cover the same pixels.
    """
    stage2 = spec.stage2
    asked = [
        field
        for field, on in (
            (INHERIT_FIELD, stage2.inherit_teacher_weights),
            (HEAD_FIELD, stage2.head_regression is not None),
        )
        if on
    ]
    if not asked or spec.student is None:
        return
    student = detector_family(spec.student.arch, "student.arch")
    teacher = detector_family(spec.teacher.arch, "teacher.arch")
    if spec.task != "detection" or student is None or teacher is None:
        raise SpecError(
            f"{asked[0].rsplit('.', 1)[1]} applies to detectors (fcos, retinanet, fasterrcnn), "
            f"and this job distils {spec.teacher.arch!r} into {spec.student.arch!r}; remove it",
            field=asked[0],
        )
    if student != teacher:
        raise SpecError(
            f"the teacher is a {teacher.name} detector and the student a {student.name} one; "
            f"{asked[0].rsplit('.', 1)[1]} pairs the parts of one family, so use a teacher and "
            "student of the same family or remove it",
            field=asked[0],
        )
    if stage2.inherit_teacher_weights:
        _check_inheriting(spec, student, num_classes)
    if stage2.head_regression is not None:
        _check_head_regression(spec, student)


def _check_inheriting(spec: JobSpec, family: DetectorFamily, num_classes: int) -> None:
    teacher = state_shapes(spec.teacher, num_classes)
    student = state_shapes(spec.distilled_student, num_classes)
    matched, kept = inheritable(teacher, student, family.inherited)
    # A layer's weight, not just a bias: output biases (one per anchor and class) match
    # whatever the widths, and copying only those would inherit nothing that was learned.
    if any(len(student[name]) > 1 for name in matched):
        return
    examples = ", ".join(
        f"{name} (teacher {teacher.get(name, 'absent')}, student {student[name]})"
        for name in kept[:3]
    )
    raise SpecError(
        f"no layer weight of the teacher's neck and head ({', '.join(family.inherited)}) has "
        f"the name and shape of the student's, so nothing would be inherited: {examples}; give "
        "both models the same fpn_channels and head arguments, or remove "
        "inherit_teacher_weights",
        field=INHERIT_FIELD,
    )


def _check_head_regression(spec: JobSpec, family: DetectorFamily) -> None:
    if family.box_regression is None:
        raise SpecError(
            f"head_regression distils a one-stage head's per-level box regression; "
            f"{family.name} detectors regress boxes on the RoIs each model samples itself, "
            "which this does not pair up; remove head_regression",
            field=HEAD_FIELD,
        )
    sizes = []
    for role, model in (("teacher", spec.teacher), ("student", spec.distilled_student)):
        args = MODELS.parse_args(model.arch, model.args, field=f"{role}.args")
        if not isinstance(args, DetectorArgs):
            raise TypeError(f"{model.arch} is in a detector family but takes no detector args")
        sizes.append((args.min_size, args.max_size))
    if sizes[0] != sizes[1]:
        raise SpecError(
            f"head_regression compares the heads' outputs pixel by pixel, but the teacher "
            f"resizes images to min_size/max_size {sizes[0]} and the student to {sizes[1]}; "
            "give both the same min_size and max_size",
            field=HEAD_FIELD,
        )
