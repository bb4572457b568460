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
class JobPlan:
    """The class count and the distilled levels in order."""

    num_classes: int
    levels: list[LevelPlan]

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "levels": [asdict(lv) for lv in self.levels]}

    def token_levels(self) -> list[dict[str, Any]]:
        """The level description stored in, and checked against, the tokens artifact."""
        return [
            {"teacher_layer": lv.teacher_layer, "level": lv.level, "channels": lv.teacher_channels}
            for lv in self.levels
        ]
