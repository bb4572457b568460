"""Hooks through which a running job reports progress, metrics and artifacts.

The core knows nothing of databases or MLflow: workers pass ``Callback`` objects that do.
``should_stop`` is how a cooperative cancel reaches the training loop: it is polled once per
step, and when it answers true the stage writes a checkpoint and raises ``JobCancelled``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

Stage = str
""""teacher", "stage1", "stage2", "baseline" or "eval"; in a comparison job each run's stage 2
is ``comparison_stage(method, seed)``, e.g. "stage2/mgd/seed1"."""


def comparison_stage(method: str, seed: int) -> Stage:
    """The stage name of one comparison run: reporters tell runs apart by it."""
    return f"stage2/{method}/seed{seed}"


def parse_stage(stage: Stage) -> tuple[str, str | None, int | None]:
    """``(kind, method, seed)``: ("stage2", "mgd", 1) for "stage2/mgd/seed1", ("stage1", None,
    None) for a plain stage name."""
    kind, _, rest = stage.partition("/")
    method, _, seed = rest.partition("/")
    if not method or not seed.startswith("seed") or not seed[4:].isdigit():
        return kind, None, None
    return kind, method, int(seed[4:])


class Callback:
    """Base class with no-op methods; override what you need."""

    def on_stage_start(self, stage: Stage, start_step: int, total_steps: int) -> None:
        """A stage begins (``start_step`` > 0 when it resumed from a checkpoint)."""

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        """After optimiser step ``step`` (1-based) with that step's scalar metrics."""

    def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        """After an evaluation, with metrics such as ``miou`` prefixed by the model evaluated."""

    def on_checkpoint(self, stage: Stage, step: int, path: Path) -> None:
        """A checkpoint was written."""

    def on_masks(self, stage: Stage, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Mask overlays (HxWx3 uint8) keyed by a name like ``level0/token3``."""

    def on_artifact(self, stage: Stage, name: str, path: Path) -> None:
        """A file the user will want (tokens, student weights, metrics summary)."""

    def on_stage_end(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        """A stage finished normally."""

    def should_stop(self) -> bool:
        """Polled once per step: true asks the stage to checkpoint and stop."""
        return False


class CallbackList(Callback):
    """Fans every call out to several callbacks; stops when any of them asks to."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_stage_start(self, stage: Stage, start_step: int, total_steps: int) -> None:
        for cb in self.callbacks:
            cb.on_stage_start(stage, start_step, total_steps)

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

    def should_stop(self) -> bool:
        return any(cb.should_stop() for cb in self.callbacks)
