"""The contract every stage-2 method fulfils, apart from the methods themselves.

``maskd_core.methods`` registers MasKD and the baselines, ``maskd_core.methods_masked`` the
masked-distillation methods of the related work; both build on what is here, so neither imports
the other's module and the registry is complete once ``maskd_core.methods`` is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from maskd_core.plan import AuxPlan, LevelPlan
from maskd_core.registry import Registry
from maskd_core.spec import MethodSpec
from maskd_core.tokens import TokenSet


class MethodParams(BaseModel):
    """Base of every method's hyperparameters: a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class MethodSetup:
    """What a distiller is built from besides its params: the job's levels, task and method.

    ``tokens`` are the stage-1 tokens for methods that need them and None for the others;
    ``num_classes`` tells a method which segmentation levels are the class logits (a
    detector's are marked in the plan, ``distils_logits``);
    ``aux`` is the auxiliary heads' pairing when validation planned it (``JobPlan.aux``);
    ``family`` is the student's model family in the registry (``method_setup`` fills it in),
    which a default weight may follow; ``iterations`` is the run's stage-2 length, which a
    method whose schedule has phases (DFMSD, PCD's ``progressive``) divides (0: unknown, the
    schedule then sits in its last phase).
    """

    levels: Sequence[LevelPlan]
    task: str
    method: MethodSpec
    tokens: TokenSet | None
    num_classes: int
    aux: AuxPlan | None = None
    family: str | None = None
    iterations: int = 0


class Distiller(nn.Module):
    """One method's loss over the distilled levels, and whatever it trains besides the student.

    ``needs_tokens``: stage 1 must run first (the runner skips it otherwise). ``uses_teacher``:
    stage 2 runs the teacher and taps the levels; a method without it trains on the task loss
    alone.
    """

    needs_tokens: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = True
    weight: float
    """Multiplies ``loss`` in the student's objective."""
    weight_field: ClassVar[str | None] = None
    """The params field ``weight`` comes from, which the hint of a diverged run names."""
    aux_layer: str | None = None
    """The auxiliary head (a module name both models share) this method also distils, or
    None: stage 2 then taps it on both models and adds ``aux_loss`` of its outputs."""

    def __init__(self, params: BaseModel, setup: MethodSetup) -> None:
        super().__init__()
        type(self).check_setup(params, setup, "stage2.method")

    @classmethod
    def check_setup(cls, params: BaseModel, setup: MethodSetup, field: str) -> None:
        """Refuse, with a ``SpecError``, a job whose levels this method cannot distil (a logit
        method on feature taps). ``field`` is where the method sits in the spec; validation
        calls this with the planned levels, so the job is refused at submission."""

    @classmethod
    def default_weight(cls, setup: MethodSetup) -> float | None:
        """The weight when ``weight_field`` is left out (None): for methods whose sensible
        weight depends on the task and the taps."""
        return None

    @classmethod
    def resolved_weight(cls, params: BaseModel, setup: MethodSetup) -> float:
        """``weight_field``'s value, or ``default_weight`` when it is left out."""
        given = getattr(params, cls.weight_field) if cls.weight_field else None
        weight = cls.default_weight(setup) if given is None else given
        if weight is None:
            raise TypeError(f"{cls.__name__} has no weight for params {params!r}")
        return float(weight)

    def loss(
        self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], step: int
    ) -> torch.Tensor:
        """The unweighted loss summed over levels; ``students`` are already aligned."""
        raise NotImplementedError

    def aux_loss(self, student: torch.Tensor, teacher: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of the ``aux_layer`` outputs, weighted relative to ``loss`` (to which it
        adds, under the same ``weight``); called only when ``aux_layer`` is set."""
        raise NotImplementedError(f"{type(self).__name__} distils no auxiliary head")


METHODS: Registry[type[Distiller]] = Registry("distillation method")


def level_is_logits(setup: MethodSetup, level: LevelPlan) -> bool:
    """Whether ``level`` is class logits, [N, K, H, W] with a class axis: a detector's as the
    plan marks them (``LevelPlan.class_logits``, from the layer its registry family names),
    or a segmentation model's, its one tap with a channel per class. (The student side is
    aligned to the teacher's channels, so the teacher's is what the loss compares.)"""
    if level.class_logits is not None:
        return True
    return setup.task == "segmentation" and level.teacher_channels == setup.num_classes


def distils_logits(setup: MethodSetup) -> bool:
    """Whether a distilled level is class logits (``level_is_logits``)."""
    return any(level_is_logits(setup, level) for level in setup.levels)


def to_teacher_size(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The student resized to the teacher's H×W when their strides differ."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student
    return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)


def generation_block(channels: int) -> nn.Sequential:
    """MGD's generation block, Conv3×3 → ReLU → Conv3×3 at the teacher's width."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1),
    )
