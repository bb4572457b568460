"""What validation learns about a job from its models: the class count and the distilled levels.

Kept apart from ``validate`` (which finds these values with a dry run) because the stages and the
methods consume a plan without needing to know how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class LevelPlan:
    """One distilled level: level ``level`` of the ``pair``-th (teacher, student) layer pair."""

    pair: int
    teacher_layer: str
    student_layer: str
    level: int
    teacher_shape: Shape
    student_shape: Shape

    @property
    def teacher_channels(self) -> int:
        return self.teacher_shape[0]

    @property
    def student_channels(self) -> int:
        return self.student_shape[0]


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

    def to_dict(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "num_classes": self.num_classes,
            "levels": [asdict(lv) for lv in self.levels],
        }
        if self.aux is not None:
            described["aux"] = asdict(self.aux)
        return described

    def token_levels(self) -> list[dict[str, Any]]:
        """The level description stored in, and checked against, the tokens artifact."""
        return [
            {"teacher_layer": lv.teacher_layer, "level": lv.level, "channels": lv.teacher_channels}
            for lv in self.levels
        ]
