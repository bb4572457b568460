"""Helpers of the service tests: a hand-driven clock and job specs the core accepts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from maskd_core.spec import JobSpec


class FakeClock:
    """A clock the test moves by hand, so lease expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def spec_body(name: str = "tiny-seg", **overrides: Any) -> dict[str, Any]:
    """A small segmentation job that ``maskd_core.validate.validate_job`` accepts."""
    body: dict[str, Any] = {
        "name": name,
        "task": "segmentation",
        "teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone"]},
        "student": {"arch": "seg_tiny_student", "layers": ["backbone"]},
        "dataset": {"name": "procedural_shapes"},
        "stage1": {"iterations": 4},
        "stage2": {"iterations": 6},
        "batch_size": 2,
    }
    body.update(overrides)
    return body


def make_spec(name: str = "tiny-seg", **overrides: Any) -> JobSpec:
    return JobSpec.model_validate(spec_body(name, **overrides))
