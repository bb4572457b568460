"""Hooks through which a running job reports progress, metrics and artifacts.

The core knows nothing of databases or MLflow: workers pass ``Callback`` objects that do.
``should_stop`` is how a cooperative cancel reaches the training loop: it is polled once per
step, and when it answers true the stage writes a checkpoint and raises ``JobCancelled``.

Every hook names the part of the job it reports on with a ``Stage``, a typed value: reporters
read its fields rather than parse a string, and ``str(stage)`` is the one spelling people see
(progress keys, events, run names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec

StageKind = Literal["teacher", "stage1", "stage2", "baseline", "eval"]
"""Teacher training, the two MasKD stages, the no-KD student, and the evaluations between."""


@dataclass(frozen=True)
class Stage:
    """Which part of a job a report is about.

    A comparison job trains one student per (method, seed): each is a stage 2 of its own,
    ``Stage("stage2", method, seed)``, written "stage2/mgd/seed1".
    """

    kind: StageKind
    method: str | None = None
    seed: int | None = None

    @classmethod
    def comparison_run(cls, method: str, seed: int) -> Stage:
        return cls("stage2", method, seed)

    @property
    def is_comparison_run(self) -> bool:
        return self.method is not None

    def __str__(self) -> str:
        if self.method is None:
            return self.kind
        return f"{self.kind}/{self.method}/seed{self.seed}"


TEACHER = Stage("teacher")
STAGE1 = Stage("stage1")
STAGE2 = Stage("stage2")
BASELINE = Stage("baseline")
EVAL = Stage("eval")


class Callback:
    """Base class with no-op methods; override what you need."""

    def on_plan(self, plan: JobPlan) -> None:
        """The job's plan, once per attempt, as soon as validation made it (before the
        teacher's evaluation and any stage): what is distilled against what
        (``JobPlan.pairing``), for the user to see while the job runs rather than once it is
        registered. Not called for a teacher job, which plans no levels."""

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        """A stage begins (``start_step`` > 0 when it resumed from a checkpoint).

        ``spec`` is the stage's own: for a comparison run, the single-method job it amounts to
        (``JobSpec.run_spec``), so what is recorded for a run is that run's method and seed.
        """

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        """After optimiser step ``step`` (1-based) with that step's scalar metrics."""

    def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        """After an evaluation, with metrics such as ``miou`` prefixed by the model evaluated."""

    def on_checkpoint(self, stage: Stage, step: int, path: Path) -> None:
        """A checkpoint was written."""

    def on_masks(self, stage: Stage, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Pictures of the learned masks (HxWx3 uint8), one per level keyed ``level<k>``: the
        input and every token's mask in one grid (``maskd_core.mask_grid``)."""

    def on_artifact(self, stage: Stage, name: str, path: Path) -> None:
        """A file the user will want (tokens, student weights, metrics summary)."""

    def on_stage_end(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        """A stage finished normally."""

    def on_run_failed(self, stage: Stage, reason: str) -> None:
        """A comparison run failed with an error of its own (``RunError``, e.g. a diverged
        loss); the comparison records it and goes on with its other runs."""

    def should_stop(self) -> bool:
        """Polled once per step: true asks the stage to checkpoint and stop."""
        return False


class CallbackList(Callback):
    """Fans every call out to several callbacks; stops when any of them asks to."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_plan(self, plan: JobPlan) -> None:
        for cb in self.callbacks:
            cb.on_plan(plan)

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        for cb in self.callbacks:
            cb.on_stage_start(stage, start_step, total_steps, spec)

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step(stage, step, metrics)

    def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_eval(stage, step, metrics)

    def on_checkpoint(self, stage: Stage, step: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(stage, step, path)

    def on_masks(self, stage: Stage, step: int, images: Mapping[str, np.ndarray]) -> None:
        for cb in self.callbacks:
            cb.on_masks(stage, step, images)

    def on_artifact(self, stage: Stage, name: str, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_artifact(stage, name, path)

    def on_stage_end(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_stage_end(stage, step, metrics)

    def on_run_failed(self, stage: Stage, reason: str) -> None:
        for cb in self.callbacks:
            cb.on_run_failed(stage, reason)

    def should_stop(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)
