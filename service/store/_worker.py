"""The worker's side of the job table: claim a lease, keep it, report, and let it go.

Every write here is a compare-and-set against the lease owner, so a worker that lost its job
(re-queued, or taken over after its lease expired) cannot change what the new owner does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from service.lifecycle import RUNNING, TERMINAL, FailureKind, JobState, can_transition
from service.models import Job
from service.store._base import StoreBase
from service.store._records import (
    CLAIM_EVENT_PREFIX,
    EVENT_INFO,
    EventRecord,
    HeartbeatResult,
    JobRecord,
    event_record,
    lease_live,
)

_CANCEL_STATES = frozenset({JobState.CANCELLING, JobState.CANCELLED})


def _claimable(job: Job, now: datetime) -> bool:
    """QUEUED, or running with an expired lease (its worker is gone), and nobody holds it."""
    state = JobState(job.state)
    return (state == JobState.QUEUED or state in RUNNING) and not lease_live(job, now)


def _lease_status(job: Job, worker_id: str) -> HeartbeatResult:
    state = JobState(job.state)
    return HeartbeatResult(
        lease_held=job.lease_owner == worker_id and state not in TERMINAL,
        cancel_requested=state in _CANCEL_STATES,
    )


class WorkerMixin(StoreBase):
    """``JobStore``'s methods for the Celery workers."""

    def get_job_unscoped(self, job_id: str) -> JobRecord | None:
        """Any project's job, with transitions: for workers and the reconciler only."""
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            return None if job is None else self._record_with_transitions(session, job)

    def claim(self, job_id: str, worker_id: str, lease_seconds: float) -> JobRecord | None:
        """Take the job's lease, or return None when the worker must not run it.

        Succeeds for a QUEUED job nobody holds, and for a running job (STAGE1/STAGE2/
        REGISTERING) whose lease expired: its worker is gone, and the new one resumes from the
        stage checkpoint *without* a state transition (the job is already in that stage).
        Returns None when any worker holds a live lease (a duplicate delivery), and for
        CANCELLING, terminal or unknown jobs. Increments ``attempt`` and records an event.
        """
        now = self._clock()
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is None or not _claimable(job, now):
                return None
            job.lease_owner = worker_id
            job.lease_expires_at = now + timedelta(seconds=lease_seconds)
            job.attempt += 1
            job.updated_at = now
            self._add_event(
                session, job.id, f"{CLAIM_EVENT_PREFIX}{worker_id}, attempt {job.attempt}", at=now
            )
            return self._record_with_transitions(session, job)

    def claimable(self, job_id: str) -> bool:
        """Whether ``claim`` could succeed now, read without a lock or a write.

        For the worker's parent process, which drops a delivery nobody may run (a finished,
        cancelled or unknown job, or one a live worker holds) without spending a pool process
        on it. Only a hint: a job that is claimable here may be claimed by another worker
        before this one's ``claim``, which stays the one that decides.
        """
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            return job is not None and _claimable(job, self._clock())

    def lease_status(self, job_id: str, worker_id: str) -> HeartbeatResult:
        """What ``heartbeat`` would answer, without extending the lease: a cheap read a
        running job makes between heartbeats, so a cancel reaches it within a second."""
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None:
                return HeartbeatResult(lease_held=False, cancel_requested=True)
            return _lease_status(job, worker_id)

    def heartbeat(self, job_id: str, worker_id: str, lease_seconds: float) -> HeartbeatResult:
        """Extend the worker's lease and report whether the user asked to cancel.

        The lease is extended only while this worker still owns it and the job is not
        terminal; an expired lease nobody else took is renewed.
        """
        now = self._clock()
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is None:
                return HeartbeatResult(lease_held=False, cancel_requested=True)
            status = _lease_status(job, worker_id)
            if status.lease_held:
                job.lease_expires_at = now + timedelta(seconds=lease_seconds)
            return status

    def transition(
        self,
        job_id: str,
        target: JobState,
        *,
        worker_id: str | None,
        message: str | None = None,
        failure_kind: FailureKind | None = None,
    ) -> bool:
        """Compare-and-set the job's state; False when refused (nothing is written then).

        Refused when ``lifecycle.ALLOWED`` has no edge from the current state to ``target``,
        or when ``worker_id`` is given and is not the lease owner. Writes a transition event
        with ``message`` (also kept as the job's latest message), sets ``stage`` for running
        states, ``started_at`` on the first running state and ``finished_at`` on a terminal
        one. FAILED without a ``failure_kind`` is recorded as ``infrastructure``. Terminal
        states and QUEUED release the lease.
        """
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is None:
                return False
            if worker_id is not None and job.lease_owner != worker_id:
                return False
            if not can_transition(JobState(job.state), target):
                return False
            self._apply(session, job, target, message, failure_kind)
            return True

    def record_progress(
        self,
        job_id: str,
        worker_id: str,
        stage: str,
        step: int,
        total_steps: int,
        metrics: dict[str, float],
    ) -> None:
        """Store the stage's step/total and merge the latest metrics (no event per step).

        Ignored when ``worker_id`` no longer holds the lease, so a worker that lost its job
        cannot overwrite the progress of the one that took over. Non-finite values (an fp16
        step its scaler skipped) are left out: JSON has no NaN, and the last finite value is
        the one worth showing.
        """
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is None or job.lease_owner != worker_id:
                return
            job.progress = {**job.progress, stage: {"step": step, "total": total_steps}}
            finite = {key: float(value) for key, value in metrics.items() if math.isfinite(value)}
            job.metrics = {**job.metrics, **finite}
            job.stage = stage
            job.updated_at = self._clock()

    def add_event(self, job_id: str, message: str, kind: str = EVENT_INFO) -> EventRecord:
        """Append a note to the job's history (e.g. "stage2 resumed at step 120 of 200")."""
        with self._sessions.begin() as session:
            return event_record(self._add_event(session, job_id, message, kind=kind))

    def record_outputs(self, job_id: str, outputs: dict[str, Any]) -> None:
        """Merge artifact paths/links and result metrics into the job's outputs."""
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is not None:
                job.outputs = {**job.outputs, **outputs}
                job.updated_at = self._clock()

    def update_output(
        self, job_id: str, key: str, change: Callable[[Any], dict[str, Any] | None]
    ) -> None:
        """Replace ``outputs[key]`` by ``change(its value, or None)``, under the job's row lock
        so a concurrent merge is not lost; ``change`` answering None leaves it as it was."""
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is None:
                return
            changed = change(job.outputs.get(key))
            if changed is not None:
                job.outputs = {**job.outputs, key: changed}
                job.updated_at = self._clock()

    def release_lease(self, job_id: str, worker_id: str) -> None:
        """Give up the lease if this worker still holds it (no-op otherwise)."""
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is not None and job.lease_owner == worker_id:
                job.lease_owner = None
                job.lease_expires_at = None
