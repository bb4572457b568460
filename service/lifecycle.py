"""Job states, failure kinds and the transitions allowed between them.

The store refuses any transition not listed here, so the state machine is enforced in one
place whatever the caller (API, worker, reconciler).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "QUEUED"
    STAGE1 = "STAGE1"
    STAGE2 = "STAGE2"
    REGISTERING = "REGISTERING"
    SUCCEEDED = "SUCCEEDED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class FailureKind(StrEnum):
    VALIDATION = "validation"
    """The spec could not run (found by the worker's own validation)."""
    USER = "user"
    """The user's data or weights are unusable (unreadable files, wrong classes)."""
    TRAINING = "training"
    """The loss diverged (inf or NaN): the spec's learning rate or loss weight is too high for
    the run. Apart from ``user`` because the data is fine and the message names the settings."""
    INFRASTRUCTURE = "infrastructure"
    """Our fault or the machine's: crashes, lost workers, out of memory, retries exhausted."""
    TIMEOUT = "timeout"
    """The job ran past its time limit."""


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.CANCELLED, JobState.FAILED})
RUNNING = frozenset({JobState.STAGE1, JobState.STAGE2, JobState.REGISTERING})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset(
        {JobState.STAGE1, JobState.STAGE2, JobState.CANCELLED, JobState.FAILED}
    ),
    JobState.STAGE1: frozenset(
        {JobState.STAGE2, JobState.CANCELLING, JobState.FAILED, JobState.QUEUED}
    ),
    JobState.STAGE2: frozenset(
        {JobState.REGISTERING, JobState.CANCELLING, JobState.FAILED, JobState.QUEUED}
    ),
    JobState.REGISTERING: frozenset(
        {JobState.SUCCEEDED, JobState.CANCELLING, JobState.FAILED, JobState.QUEUED}
    ),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.FAILED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.FAILED: frozenset(),
}
"""Running → QUEUED is the reconciler handing a job whose worker died back to the queue."""


def can_transition(current: JobState, target: JobState) -> bool:
    return target in ALLOWED[current]
