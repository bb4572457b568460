"""Errors the core raises, grouped by who can fix them.

The service maps each class onto a job failure kind, so the split matters:
``SpecError`` is the submitter's to fix before training (HTTP 422), ``DataError`` is found while
training and is still the user's (FAILED, kind ``user``), a ``RunError`` such as
``TrainingDiverged`` is one student run whose own settings blew the loss up (FAILED, kind
``training``; in a comparison only that run fails, and ``ComparisonFailed`` once every run has),
``JobCancelled`` is the cooperative stop a user asked for, and ``RankLost`` a multi-process job's
process gone, which sends the job back to the queue to resume. Anything else escaping the core is
treated as an infrastructure failure.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class MaskdError(Exception):
    """Base class of every error the core raises on purpose."""


class SpecError(MaskdError, ValueError):
    """The job spec cannot run as written. The message says what is wrong and how to fix it.

    ``field`` is the dotted path of the offending spec field (e.g. ``teacher.layers[1]``), so the
    API can point at it the way pydantic does for structural errors.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownNameError(SpecError):
    """A name (model, layer, dataset, task, method) is not one of the known choices."""

    def __init__(
        self, kind: str, name: str, choices: Iterable[str], field: str | None = None
    ) -> None:
        options = sorted(choices)
        close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(options[:40]) + (" ..." if len(options) > 40 else "")
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {listing}", field=field)
        self.kind = kind
        self.name = name
        self.close_matches = close


class DataError(MaskdError):
    """The data a job points at cannot be read or does not match the task (user-fixable)."""


@dataclass(frozen=True)
class Setting:
    """A spec field and the value a run used, as hints name it: ``stage2.optimizer.lr = 0.5``."""

    field: str
    value: float | None

    def __str__(self) -> str:
        return f"{self.field} = {self.value:g}" if self.value is not None else self.field


class RunError(MaskdError):
    """An error confined to one student run: its method's or optimiser's settings failed it.

    The data, the teacher and the machine were fine, so the job's other students are not
    affected: a comparison job records the run as failed (with this message) and trains the
    others, while a single job, which has only this student, fails with it.
    """


class TrainingDiverged(RunError):  # noqa: N818 - names what happened, like JobCancelled
    """The loss became inf or NaN: the run's optimisation settings are too aggressive for it.

    Not a ``DataError``: the data was read and matched the task, and the fix is a setting, so the
    message names the stage's learning rate, the distillation method's loss weight (MasKD's
    ``loss_weight``, MGD's ``alpha``; stage 2 only) and the gradient clip, each as the spec field
    with the value the run used. ``nonfinite`` lists the loss parts that were non-finite
    themselves; ``steps`` is how many steps in a row had a non-finite loss (more than one only
    under fp16, whose scaler skips such steps).
    """

    def __init__(
        self,
        stage: str,
        step: int,
        loss: float,
        nonfinite: Sequence[str],
        *,
        lr: Setting,
        loss_weight: Setting | None,
        grad_clip: Setting,
        steps: int = 1,
    ) -> None:
        self.stage = stage
        self.step = step
        self.loss = loss
        self.nonfinite = tuple(nonfinite)
        self.lr = lr
        self.loss_weight = loss_weight
        self.grad_clip = grad_clip
        self.steps = steps
        super().__init__(self._message())

    def _message(self) -> str:
        when = f"{self.stage} step {self.step}"
        if self.steps > 1:
            when += f" (non-finite for {self.steps} steps in a row, each skipped by fp16's scaler)"
        parts = f" (non-finite: {', '.join(self.nonfinite)})" if self.nonfinite else ""
        named = [("the learning rate", self.lr)]
        if self.loss_weight is not None:
            named.append(("the loss weight", self.loss_weight))
        lower = " and ".join(f"{what} {setting}" for what, setting in named)
        tries = ", ".join(
            f"{setting.field.rsplit('.', 1)[-1]} {setting.value / 10:g}"
            for _, setting in named
            if setting.value is not None
        )
        clip = (
            f"set {self.grad_clip.field} (e.g. 1.0)"
            if self.grad_clip.value is None
            else f"lower {self.grad_clip}"
        )
        return (
            f"training diverged at {when}: the loss is {self.loss}{parts}. Lower {lower}, "
            f"e.g. by 10x ({tries}); to bound each update, also {clip}"
        )


class ComparisonFailed(MaskdError):  # noqa: N818 - names what happened, like JobCancelled
    """Every run of a comparison failed with a ``RunError``: no student to tabulate or register.

    ``failures`` pairs each run's name ("stage2/fitnet/seed0") with its reason, all named in the
    message, since each may need its own setting lowered.
    """

    def __init__(self, failures: Sequence[tuple[str, str]]) -> None:
        self.failures = tuple(failures)
        listed = "; ".join(f"{run}: {reason}" for run, reason in self.failures)
        super().__init__(f"every comparison run failed. {listed}")


class JobCancelled(MaskdError):  # noqa: N818 - it is a signal, not a failure
    """Raised inside a stage after a cooperative stop was requested and a checkpoint written."""

    def __init__(self, stage: str, step: int) -> None:
        super().__init__(f"cancelled during {stage} at step {step}")
        self.stage = stage
        self.step = step


class RankLost(MaskdError):  # noqa: N818 - reads as the condition it reports
    """A helper rank exited before the job ended (killed, out of memory, crashed).

    Not the spec's fault nor the data's: the attempt ends and the job goes back to the queue,
    to resume from its last checkpoint at whatever number of processes the next worker has."""

    def __init__(self, rank: int, exitcode: int | None) -> None:
        how = (
            f"exit code {exitcode}" if exitcode is None or exitcode >= 0 else f"signal {-exitcode}"
        )
        super().__init__(
            f"training process rank {rank} exited during the job ({how}); the job resumes "
            "from its last checkpoint"
        )
        self.rank = rank
        self.exitcode = exitcode
