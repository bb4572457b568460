"""What validation learns about a job from its models: the class count and the distilled levels.

Kept apart from ``validate`` (which finds these values with a dry run) because the stages and the
methods consume a plan without needing to know how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class ClassLogits:
    """What marks a level as a detector's class logits: each of its [N·A, K, H, W] rows holds
    the ``classes`` (K) logits of one anchor at one pixel, ``anchors`` (A) of them per pixel."""

    classes: int
    anchors: int


@dataclass(frozen=True)
class LevelPlan:
    """One distilled level: level ``level`` of the ``pair``-th (teacher, student) layer pair."""

    pair: int
    teacher_layer: str
    student_layer: str
    level: int
    teacher_shape: Shape
    student_shape: Shape
    teacher_stride: int | None = None
    """The level's stride when its layer is one of the model's default taps (declared in the
    registry); None for a layer the spec chose, whose stride only its size tells."""
    student_stride: int | None = None
    class_logits: ClassLogits | None = None
    """Set when both layers are a detector's class logits (the registry names the module of
    each family, ``DetectorFamily.class_logits``), which a logit method distils class by class;
    None for features, and for a segmentation model's logits, which are known by their channels
    (``methods_base.level_is_logits``)."""

    @property
    def teacher_channels(self) -> int:
        return self.teacher_shape[0]

    @property
    def student_channels(self) -> int:
        return self.student_shape[0]

    def described(self, align: str) -> dict[str, Any]:
        """The level as the pairing report shows it: both sides, how the student's channels
        are aligned (``align``: ``stage2.align``), whether its map is resized and, for a
        detector's class logits, their classes and anchors."""
        t_size, s_size = self.teacher_shape[1:], self.student_shape[1:]
        described: dict[str, Any] = {
            "teacher_layer": self.teacher_layer,
            "student_layer": self.student_layer,
            "level": self.level,
            "teacher": _side(self.teacher_shape, self.teacher_stride),
            "student": _side(self.student_shape, self.student_stride),
            "align": (
                "identity"
                if align == "identity"
                else f"conv1x1 {self.student_channels}->{self.teacher_channels}"
            ),
            "resize": None if t_size == s_size else f"bilinear {_size(s_size)}->{_size(t_size)}",
        }
        if self.class_logits is not None:  # a key the report adds for a detector's logits only
            described["class_logits"] = asdict(self.class_logits)
        return described


def _side(shape: Shape, stride: int | None) -> dict[str, Any]:
    return {"channels": shape[0], "size": [shape[1], shape[2]], "stride": stride}


def _size(size: tuple[int, ...]) -> str:
    return "x".join(str(side) for side in size)


LAYERS_FROM_REGISTRY = "registry defaults"
LAYERS_FROM_SPEC = "spec"


@dataclass(frozen=True)
class AuxPlan:
    """The auxiliary heads both models tap under ``layer``, distilled beside the levels.

    Their logits go through the tokens of level ``tokens_level`` (the teacher's main logits,
    which have the aux head's channels): stage 1 learns no tokens of their own.
    """

    layer: str
    teacher_shape: Shape
    student_shape: Shape
    tokens_level: int


@dataclass(frozen=True)
class JobPlan:
    """The class count, the distilled levels in order and, when distilled, the aux heads."""

    num_classes: int
    levels: list[LevelPlan]
    aux: AuxPlan | None = None
    align: str = "conv1x1"
    """``stage2.align``: how each student level is brought to its teacher level's channels."""
    defaulted: tuple[str, ...] = ()
    """The models (``teacher``, ``student``) whose layers are their registry defaults, the
    spec having named none."""

    def to_dict(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "num_classes": self.num_classes,
            "levels": [asdict(lv) for lv in self.levels],
        }
        if self.aux is not None:
            described["aux"] = asdict(self.aux)
        if self.levels:
            described["pairing"] = self.pairing()
        return described

    def pairing(self) -> dict[str, Any]:
        """What is distilled against what, as the job reports it to its user (its outputs, its
        MLflow run's ``pairing.json``, ``summary.json``): where each side's layers came from,
        and per level both sides' channels, sizes and strides, the align and any resize."""
        described: dict[str, Any] = {
            "layers_from": {
                role: LAYERS_FROM_REGISTRY if role in self.defaulted else LAYERS_FROM_SPEC
                for role in ("teacher", "student")
            },
            "levels": [level.described(self.align) for level in self.levels],
            "aux": None,
        }
        if self.aux is not None:
            described["aux"] = {
                "layer": self.aux.layer,
                "teacher": _side(self.aux.teacher_shape, None),
                "student": _side(self.aux.student_shape, None),
            }
        return described

    def pairing_line(self) -> str:
        """The pairing in one line (an MLflow tag): ``backbone->backbone (5 levels)``, each
        layer pair once, and where the layers came from when the registry chose them."""
        pairs: dict[tuple[str, str], int] = {}
        for level in self.levels:
            key = (level.teacher_layer, level.student_layer)
            pairs[key] = pairs.get(key, 0) + 1
        line = ", ".join(
            f"{teacher}->{student} ({count} level{'s' if count > 1 else ''})"
            for (teacher, student), count in pairs.items()
        )
        if self.aux is not None:
            line += f", {self.aux.layer}->{self.aux.layer} (aux)"
        if self.defaulted:
            line += f"; {' and '.join(self.defaulted)} layers: {LAYERS_FROM_REGISTRY}"
        return line

    def token_levels(self) -> list[dict[str, Any]]:
        """The level description stored in, and checked against, the tokens artifact."""
        return [
            {"teacher_layer": lv.teacher_layer, "level": lv.level, "channels": lv.teacher_channels}
            for lv in self.levels
        ]
