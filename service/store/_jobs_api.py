"""The API's side of the job table: submit, read, list, cancel, and the event history.

Everything here is scoped to one project (another project's job reads as "not found"), unlike
the worker and reconciler methods, which act on any job by id.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from maskd_core.spec import JobSpec
from service.lifecycle import RUNNING, TERMINAL, JobState
from service.models import Job, JobEvent, Project
from service.store._base import StoreBase
from service.store._records import (
    EVENT_TRANSITION,
    EventRecord,
    IdempotencyConflict,
    JobAlreadyFinished,
    JobNotFound,
    JobQuotas,
    JobRecord,
    QuotaExceeded,
    decode_cursor,
    encode_cursor,
    event_record,
    job_record,
    spec_fingerprint,
)

QUOTA_RUNNING_STATES = RUNNING | {JobState.CANCELLING}
"""The states that count against ``JobQuotas.max_running``: the job holds a worker."""


class JobsApiMixin(StoreBase):
    """``JobStore``'s methods for the HTTP API."""

    def create_job(
        self,
        project_id: str,
        spec: JobSpec,
        idempotency_key: str | None = None,
        *,
        quotas: JobQuotas | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new QUEUED job; returns ``(job, created)``.

        With an ``idempotency_key`` already used in this project, the earlier job is returned
        (``created`` False) when the spec is the same, and ``IdempotencyConflict`` is raised
        when it differs. The caller dispatches only when ``created`` is True.

        With ``quotas``, a new job that would go over them raises ``QuotaExceeded`` and
        nothing is stored; a replay is never refused. The count and the insert happen in one
        transaction holding the project's row lock (``SELECT ... FOR NO KEY UPDATE`` on
        PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers), so concurrent
        submissions cannot all slip under the quota.
        """
        fingerprint = spec_fingerprint(spec)
        if idempotency_key is not None:
            earlier = self._job_by_idempotency_key(project_id, idempotency_key)
            if earlier is not None:
                return self._replay(earlier, idempotency_key, fingerprint), False
        now = self._clock()
        job = Job(
            id=str(uuid.uuid4()),
            project_id=project_id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            spec_hash=fingerprint,
            idempotency_key=idempotency_key,
            state=JobState.QUEUED.value,
            stage=None,
            progress={},
            metrics={},
            outputs={},
            attempt=0,
            created_at=now,
            updated_at=now,
        )
        try:
            with self._sessions.begin() as session:
                if quotas is not None and quotas.enabled:
                    earlier = self._check_quotas(session, project_id, quotas, idempotency_key)
                    if earlier is not None:
                        return self._replay(earlier, idempotency_key or "", fingerprint), False
                session.add(job)
                session.flush()
                event = self._add_event(
                    session,
                    job.id,
                    "job submitted",
                    kind=EVENT_TRANSITION,
                    to_state=JobState.QUEUED,
                    at=now,
                )
                record = job_record(job, (event_record(event),))
        except IntegrityError:
            if idempotency_key is None:
                raise
            # A concurrent request with the same key won the insert.
            earlier = self._job_by_idempotency_key(project_id, idempotency_key)
            if earlier is None:
                raise
            return self._replay(earlier, idempotency_key, fingerprint), False
        return record, True

    def get_job(self, project_id: str, job_id: str) -> JobRecord | None:
        """The job with its transitions, or None when it is not this project's."""
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None or job.project_id != project_id:
                return None
            return self._record_with_transitions(session, job)

    def list_jobs(
        self,
        project_id: str,
        *,
        states: Sequence[JobState] = (),
        name: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> tuple[list[JobRecord], str | None]:
        """One page of the project's jobs, newest first, and the cursor of the next page.

        Filters are part of the SQL query, so a page is always full when enough jobs match
        (unlike APIs that filter after limiting). ``name`` matches exactly; the time bounds
        are exclusive. Raises ``InvalidCursor`` for a cursor this store did not produce.
        """
        query = select(Job).where(Job.project_id == project_id)
        if states:
            query = query.where(Job.state.in_([state.value for state in states]))
        if name is not None:
            query = query.where(Job.name == name)
        if created_after is not None:
            query = query.where(Job.created_at > created_after)
        if created_before is not None:
            query = query.where(Job.created_at < created_before)
        if cursor is not None:
            after_time, after_id = decode_cursor(cursor)
            query = query.where(
                or_(
                    Job.created_at < after_time,
                    and_(Job.created_at == after_time, Job.id < after_id),
                )
            )
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        with self._sessions.begin() as session:
            jobs = list(session.scalars(query))
            records = [job_record(job, ()) for job in jobs[:limit]]
        next_cursor = None
        if len(jobs) > limit:
            last = records[-1]
            next_cursor = encode_cursor(last.created_at, last.id)
        return records, next_cursor

    def request_cancel(self, project_id: str, job_id: str) -> JobRecord:
        """Ask for a job to stop.

        A QUEUED job becomes CANCELLED at once (a worker that already claimed it finds its
        transition refused and its lease gone); a running job becomes CANCELLING and its worker
        learns of it at the next heartbeat; a CANCELLING job is returned unchanged. Raises
        ``JobNotFound`` (not this project's) or ``JobAlreadyFinished`` (terminal).
        """
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is None or job.project_id != project_id:
                raise JobNotFound(f"job {job_id} not found")
            state = JobState(job.state)
            if state in TERMINAL:
                raise JobAlreadyFinished(job_id, state)
            if state == JobState.QUEUED:
                self._apply(session, job, JobState.CANCELLED, "cancelled before it started")
            elif state in RUNNING:
                self._apply(
                    session,
                    job,
                    JobState.CANCELLING,
                    "cancel requested; stopping at the next checkpoint",
                )
            return self._record_with_transitions(session, job)

    def list_events(
        self, project_id: str, job_id: str, after_id: int = 0, limit: int = 1000
    ) -> list[EventRecord]:
        """The job's events with id above ``after_id``, oldest first.

        Raises ``JobNotFound`` when the job is not this project's, so an empty list always
        means "nothing new" rather than "no such job".
        """
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None or job.project_id != project_id:
                raise JobNotFound(f"job {job_id} not found")
            events = session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
                .order_by(JobEvent.id)
                .limit(limit)
            )
            return [event_record(event) for event in events]

    def mark_dispatched(self, job_id: str) -> None:
        """Record that a message for the job was just sent (the reconciler's redispatch clock)."""
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is not None:
                job.dispatched_at = self._clock()

    def check_quotas(
        self, project_id: str, quotas: JobQuotas, idempotency_key: str | None = None
    ) -> None:
        """Raise ``QuotaExceeded`` if a new job of the project would go over ``quotas`` now,
        unless ``idempotency_key`` already names one of its jobs (a replay).

        A cheap early answer that takes no lock, so the API can refuse before it validates a
        spec; ``create_job`` checks again when it stores the job, which is what counts.
        """
        if not quotas.enabled:
            return
        with self._sessions.begin() as session:
            self._check_quotas(session, project_id, quotas, idempotency_key, lock=False)

    def _check_quotas(
        self,
        session: Session,
        project_id: str,
        quotas: JobQuotas,
        idempotency_key: str | None,
        *,
        lock: bool = True,
    ) -> JobRecord | None:
        """Lock the project's row, then raise ``QuotaExceeded`` if a new job would go over
        ``quotas``. Returns the job an ``idempotency_key`` already made when a concurrent
        submission stored it while this one waited for the lock: that is a replay."""
        if lock:
            session.get(Project, project_id, with_for_update={"key_share": True})
        if idempotency_key is not None:
            earlier = session.scalars(
                select(Job).where(
                    Job.project_id == project_id, Job.idempotency_key == idempotency_key
                )
            ).one_or_none()
            if earlier is not None:
                return self._record_with_transitions(session, earlier)
        counted = [state.value for state in (JobState.QUEUED, *QUOTA_RUNNING_STATES)]
        rows = session.execute(
            select(Job.state, func.count())
            .where(Job.project_id == project_id, Job.state.in_(counted))
            .group_by(Job.state)
        )
        counts = {state: count for state, count in rows}
        queued = counts.get(JobState.QUEUED.value, 0)
        running = sum(counts.get(state.value, 0) for state in QUOTA_RUNNING_STATES)
        if quotas.max_queued > 0 and queued >= quotas.max_queued:
            raise QuotaExceeded("queued_jobs", quotas.max_queued, queued)
        if quotas.max_running > 0 and running >= quotas.max_running:
            raise QuotaExceeded("running_jobs", quotas.max_running, running)
        return None

    def _job_by_idempotency_key(self, project_id: str, key: str) -> JobRecord | None:
        with self._sessions.begin() as session:
            job = session.scalars(
                select(Job).where(Job.project_id == project_id, Job.idempotency_key == key)
            ).one_or_none()
            return None if job is None else self._record_with_transitions(session, job)

    def _replay(self, earlier: JobRecord, key: str, fingerprint: str) -> JobRecord:
        if spec_fingerprint(earlier.spec) != fingerprint:
            raise IdempotencyConflict(key, earlier.id)
        return earlier
