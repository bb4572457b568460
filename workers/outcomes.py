"""How an attempt that did not succeed ends: the attempt limit and the failure kinds.

Everything that can stop a job is mapped here onto the lifecycle, so the task module only runs
the job: a cancel (or a stop the lease keeper asked for) becomes CANCELLED, a timeout or a lost
lease; the core's errors become failure kinds the user can act on (``validation``: the spec;
``user``: the data; ``training``: a diverged loss, whose message names the settings to lower,
or a comparison whose every run failed so, naming each);
anything else is ``infrastructure``, with its traceback kept as an event.
"""

from __future__ import annotations

import logging
import traceback

from celery.exceptions import SoftTimeLimitExceeded

from maskd_core.errors import (
    ComparisonFailed,
    DataError,
    JobCancelled,
    RankLost,
    RunError,
    SpecError,
)
from service.config import Settings
from service.lifecycle import FailureKind, JobState
from service.store import JobStore
from workers.lease import StopReason

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Starts a job gets before it is failed instead of re-run. A job that kills its worker every
time (out of memory, the hard time limit) would otherwise be re-queued by the reconciler
forever; a worker lost now and then is well within it."""

LEASE_LOST = "lease_lost"
"""What the task reports when another worker owns the job now: it records nothing."""

RANK_LOST = "rank_lost"
"""What the task reports when one of a multi-process job's processes died: the job keeps its
state, the lease is released, and the reconciler re-queues it to resume from its checkpoint
(the path a lost worker takes)."""


def time_limit_message(settings: Settings) -> str:
    return (
        f"the job ran past its time limit of {settings.job_soft_time_limit_seconds} s; "
        "resubmit it with fewer iterations, or ask an operator to raise "
        "MASKD_JOB_SOFT_TIME_LIMIT_SECONDS"
    )


def attempts_exhausted_message(attempt: int) -> str:
    return (
        f"its worker was lost {attempt - 1} times (crash, out of memory or the hard time "
        "limit); not retried again. The job's events say where each attempt stopped"
    )


class AttemptEnd:
    """Records on the job how one attempt ended, for the worker holding its lease."""

    def __init__(self, store: JobStore, settings: Settings, job_id: str, worker_id: str) -> None:
        self.store = store
        self.settings = settings
        self.job_id = job_id
        self.worker_id = worker_id

    def fail(self, kind: FailureKind, message: str) -> str:
        self.store.transition(
            self.job_id,
            JobState.FAILED,
            worker_id=self.worker_id,
            message=message,
            failure_kind=kind,
        )
        return JobState.FAILED.value

    def after(self, error: Exception, stop_reason: StopReason | None) -> str:
        """The state the job is left in after ``error`` ended the attempt."""
        if isinstance(error, JobCancelled):
            return self._stopped(error, stop_reason)
        if isinstance(error, RankLost):
            logger.warning("job %s: %s", self.job_id, error)
            self.store.add_event(self.job_id, str(error))
            return RANK_LOST
        if isinstance(error, SpecError):
            where = f" (field {error.field})" if error.field else ""
            return self.fail(FailureKind.VALIDATION, f"{error}{where}")
        if isinstance(error, DataError):
            return self.fail(FailureKind.USER, str(error))
        if isinstance(error, RunError | ComparisonFailed):
            # A single job's student, or every student of a comparison, failed on its settings.
            return self.fail(FailureKind.TRAINING, str(error))
        if isinstance(error, SoftTimeLimitExceeded):
            # The backstop fired: the loop stopped polling (stuck in an evaluation, say).
            return self.fail(FailureKind.TIMEOUT, time_limit_message(self.settings))
        logger.error("job %s failed", self.job_id, exc_info=error)
        trace = "".join(traceback.format_exception(error))
        self.store.add_event(self.job_id, trace, kind="error")
        return self.fail(FailureKind.INFRASTRUCTURE, f"{type(error).__name__}: {error}")

    def _stopped(self, stopped: JobCancelled, stop_reason: StopReason | None) -> str:
        if stop_reason is StopReason.LEASE_LOST:
            logger.warning("job %s: stopped at %s after losing the lease", self.job_id, stopped)
            return LEASE_LOST
        if stop_reason is StopReason.TIME_LIMIT:
            return self.fail(
                FailureKind.TIMEOUT, f"{time_limit_message(self.settings)} ({stopped})"
            )
        # The API normally set CANCELLING already; this covers a stop the worker initiated.
        self.store.transition(self.job_id, JobState.CANCELLING, worker_id=self.worker_id)
        cancelled = self.store.transition(
            self.job_id,
            JobState.CANCELLED,
            worker_id=self.worker_id,
            message=f"{stopped}; checkpoint kept in the job's work directory",
        )
        return JobState.CANCELLED.value if cancelled else LEASE_LOST
