"""A core ``Callback`` that writes a running job's progress to the job store.

The core library knows nothing of databases; this is the bridge. Stage starts become lifecycle
transitions and events (an event says whether a stage started afresh or resumed from a
checkpoint, which is what users and tests read to tell a resume from a restart), steps become
progress rows throttled to about one write a second so SQL never slows the training loop,
evaluations become metrics, every checkpoint moves the progress to its step, and a comparison
run that failed on its own becomes an ``error`` event naming it and the reason. The job's plan
becomes its ``outputs.pairing`` and an event, as soon as the attempt made it. The stage that
starts becomes the ``stage`` of the job's log lines (``service.logs``). ``should_stop`` answers
from the lease keeper, so a cancel or a lost lease reaches the loop without the loop touching
SQL.

Progress and notes are best effort: a database hiccup must not fail hours of training (the lease
keeper decides when the database has been gone too long). Transitions are not: a job whose
state cannot be recorded fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from maskd_core.callbacks import Callback, Stage
from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec
from service.lifecycle import JobState, can_transition
from service.logs import set_job_stage
from service.store import JobStore
from workers.lease import LeaseKeeper

logger = logging.getLogger(__name__)

_STAGE_STATES: dict[str, JobState] = {"stage1": JobState.STAGE1, "stage2": JobState.STAGE2}
_STAGE_NAMES: dict[JobState, str] = {state: name for name, state in _STAGE_STATES.items()}


def format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))


def success_message(
    metrics: Mapping[str, float], failed: Sequence[Mapping[str, Any]], students: int
) -> str:
    """The SUCCEEDED transition's message; a comparison that finished with failed runs says
    which (``failed``: their failure records) out of how many, so a partial table is never
    mistaken for a whole one."""
    if not failed:
        return f"succeeded: {format_metrics(metrics)}"
    runs = ", ".join(str(failure["stage"]) for failure in failed)
    return (
        f"succeeded with {len(failed)} of {students + len(failed)} comparison runs failed "
        f"({runs}; reasons in outputs.comparison): {format_metrics(metrics)}"
    )


def estimate_with_actual(
    estimate: Mapping[str, Any] | None, stage: str, seconds_per_step: float
) -> dict[str, Any] | None:
    """``estimate`` (a job's ``outputs.estimate``, ``maskd_core.estimate``'s format) with the
    loop ``stage``'s actual time beside its estimated one; None when the job has no estimate
    or the estimate has no such loop.

    Both sides are iterations × seconds per step, so what is compared is the training loop
    alone, measured rather than extrapolated where the attempt ran every step. Once every
    estimated loop has its actual time, ``total`` compares their sums."""
    if estimate is None:
        return None
    planned = {entry["stage"]: entry for entry in estimate.get("stages", [])}
    if stage not in planned:
        return None
    check = dict(estimate.get("actual") or {})
    stages = dict(check.get("stages") or {})
    iterations = planned[stage]["iterations"]
    stages[stage] = _times(
        iterations * planned[stage]["seconds_per_step"], iterations * seconds_per_step
    )
    total = None
    if set(stages) >= set(planned):
        total = _times(
            sum(stages[name]["estimated_seconds"] for name in planned),
            sum(stages[name]["actual_seconds"] for name in planned),
        )
    return {**estimate, "actual": {"stages": stages, "total": total}}


def _times(estimated: float, actual: float) -> dict[str, float | None]:
    """A ratio of None when nothing was estimated (JSON has no infinity)."""
    ratio = actual / estimated if estimated > 0 else None
    return {"estimated_seconds": estimated, "actual_seconds": actual, "ratio": ratio}


class StoreReporter(Callback):
    """Reports one job's progress for the worker holding its lease.

    ``state`` is the lifecycle state this worker last put the job in; the task sets it after
    its first transition and the reporter moves it forward as stages start.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        worker_id: str,
        lease: LeaseKeeper,
        *,
        state: JobState,
        progress_interval_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._worker_id = worker_id
        self._lease = lease
        self._progress_interval = progress_interval_seconds
        self._clock = clock
        self.state = state
        self._totals: dict[str, int] = {}
        self._current: str | None = None
        """The stage started last: what an evaluation between stages belongs to."""
        self._steps: dict[str, int] = {}
        self._last_progress_at = float("-inf")
        self._transition_refused = False
        self._started: dict[str, tuple[float, int]] = {}
        """Per stage, when this attempt started it and from which step: its actual time."""

    def on_plan(self, plan: JobPlan) -> None:
        # Before the teacher's evaluation and stage 1, so GET /v1/jobs/{id} shows what is
        # distilled while the job runs (and after a cancel), and a follower reads it in one line.
        # It replaces what submission recorded: this plan is the one that runs (a models:/ alias
        # may have moved since).
        try:
            self._store.record_outputs(self._job_id, {"pairing": plan.pairing()})
        except SQLAlchemyError:
            logger.warning("job %s: pairing not recorded", self._job_id, exc_info=True)
        self._note(f"pairing: {plan.pairing_line()}")

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        self._totals[str(stage)] = total_steps
        self._current = str(stage)
        self._started[str(stage)] = (self._clock(), start_step)
        set_job_stage(str(stage))
        # A comparison's runs ("stage2/mgd/seed1") all belong to STAGE2; progress stays keyed
        # by the full name, so each run has its own row.
        target = _STAGE_STATES.get(stage.kind)
        if target is not None and target != self.state and can_transition(self.state, target):
            if self._store.transition(self._job_id, target, worker_id=self._worker_id):
                self.state = target
            else:
                # The job was cancelled or taken over meanwhile: stop at the next step.
                logger.warning("job %s: transition to %s refused", self._job_id, target)
                self._transition_refused = True
        if start_step > 0:
            message = f"{stage} resumed from checkpoint at step {start_step} of {total_steps}"
        else:
            message = f"{stage} started at step 0 of {total_steps}"
        self._note(message)
        self._write_progress(str(stage), start_step, {})

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        if self._clock() - self._last_progress_at >= self._progress_interval:
            self._write_progress(str(stage), step, metrics)

    def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        # Evaluations between stages ("eval") belong to the stage that ran last (a teacher
        # job's "teacher" too), or, before any, to the one the job's state names.
        name = str(stage)
        owner = (
            name if name in self._totals else self._current or _STAGE_NAMES.get(self.state, name)
        )
        self._write_progress(owner, self._steps.get(owner, step), metrics)
        self._note(f"{stage} evaluation at step {step}: {format_metrics(metrics)}")

    def on_checkpoint(self, stage: Stage, step: int, path: Path) -> None:
        # Unthrottled: the progress a user reads after a cancel or a crash is the step the
        # job will resume from, not an older one the throttle happened to keep.
        self._write_progress(str(stage), step, {})

    def on_stage_end(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        self._write_progress(str(stage), step, metrics)
        self._note(f"{stage} finished at step {step}")
        self._check_estimate(str(stage), step)

    def on_run_failed(self, stage: Stage, reason: str) -> None:
        # An "error" event, so a user watching the stream sees which run is missing from the
        # table and why, while the job itself goes on.
        message = f"{stage} failed, the comparison goes on without it: {reason}"
        try:
            self._store.add_event(self._job_id, message, kind="error")
        except SQLAlchemyError:
            logger.warning("job %s: event %r not recorded", self._job_id, message, exc_info=True)

    def should_stop(self) -> bool:
        return self._transition_refused or self._lease.should_stop()

    def _write_progress(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        """Progress rows are keyed by the stage as people read it ("stage2/mgd/seed1")."""
        self._last_progress_at = self._clock()
        self._steps[stage] = step
        try:
            self._store.record_progress(
                self._job_id,
                self._worker_id,
                stage,
                step,
                self._totals.get(stage, 0),
                dict(metrics),
            )
        except SQLAlchemyError:
            logger.warning("job %s: progress not recorded", self._job_id, exc_info=True)

    def _check_estimate(self, stage: str, step: int) -> None:
        """The loop's actual seconds per step beside the submission's estimate, if any."""
        started_at, start_step = self._started.get(stage, (self._clock(), step))
        if step <= start_step:
            return
        seconds_per_step = (self._clock() - started_at) / (step - start_step)
        try:
            self._store.update_output(
                self._job_id,
                "estimate",
                lambda estimate: estimate_with_actual(estimate, stage, seconds_per_step),
            )
        except SQLAlchemyError:
            logger.warning("job %s: estimate check not recorded", self._job_id, exc_info=True)

    def _note(self, message: str) -> None:
        try:
            self._store.add_event(self._job_id, message)
        except SQLAlchemyError:
            logger.warning("job %s: event %r not recorded", self._job_id, message, exc_info=True)
