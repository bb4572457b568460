"""The API's side of the job table: submit, read, list, cancel, and the event history.

Everything here is scoped to one project (another project's job reads as "not found"), unlike
the worker and reconciler methods, which act on any job by id.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Result, Table, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from maskd_core.spec import JobSpec
from service.lifecycle import RUNNING, TERMINAL, JobState
from service.models import Job, JobEvent, JobLabel, Project
from service.store._base import StoreBase
from service.store._outbox import enqueue_state_change
from service.store._reads import JOB_WITH_TRANSITIONS, JobFilter, job_from_rows
from service.store._records import (
    EVENT_TRANSITION,
    EventRecord,
    IdempotencyConflict,
    JobAlreadyFinished,
    JobNotFound,
    JobQuotas,
    JobRecord,
    QuotaExceeded,
    event_record,
    spec_fingerprint,
)

QUOTA_RUNNING_STATES = RUNNING | {JobState.CANCELLING}
"""The states that count against ``JobQuotas.max_running``: the job holds a worker."""

_jobs, _events = cast(Table, Job.__table__), cast(Table, JobEvent.__table__)
_labels = cast(Table, JobLabel.__table__)


_QUOTA_COUNTS = (
    select(_jobs.c.state, func.count())
    .where(
        _jobs.c.project_id == bindparam("project_id"),
        _jobs.c.state.in_([state.value for state in (JobState.QUEUED, *QUOTA_RUNNING_STATES)]),
    )
    .group_by(_jobs.c.state)
)
"""The project's jobs per state that count against its quotas."""
_STAMP_DISPATCHED = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("job_id"))
    .values(dispatched_at=bindparam("dispatched_at"))
)


def _counts(rows: Result[str, int]) -> dict[str, int]:
    return {state: count for state, count in rows}


def _refuse_over_quota(counts: dict[str, int], quotas: JobQuotas) -> None:
    """Raise ``QuotaExceeded`` when one more job would go over ``quotas``, given the
    project's ``_QUOTA_COUNTS``."""
    queued = counts.get(JobState.QUEUED.value, 0)
    running = sum(counts.get(state.value, 0) for state in QUOTA_RUNNING_STATES)
    if quotas.max_queued > 0 and queued >= quotas.max_queued:
        raise QuotaExceeded("queued_jobs", quotas.max_queued, queued)
    if quotas.max_running > 0 and running >= quotas.max_running:
        raise QuotaExceeded("running_jobs", quotas.max_running, running)


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
        job_id = str(uuid.uuid4())
        row = {
            "id": job_id,
            "project_id": project_id,
            "name": spec.name,
            "spec": spec.model_dump(mode="json"),
            "spec_hash": fingerprint,
            "idempotency_key": idempotency_key,
            "state": JobState.QUEUED.value,
            "stage": None,
            "progress": {},
            "metrics": {},
            "outputs": {},
            "failure_kind": None,
            "message": None,
            "attempt": 0,
            "lease_owner": None,
            "lease_expires_at": None,
            "dispatched_at": None,
            "created_at": now,
            "updated_at": now,
            "started_at": None,
            "finished_at": None,
        }
        submitted = {
            "job_id": job_id,
            "kind": EVENT_TRANSITION,
            "from_state": None,
            "to_state": JobState.QUEUED.value,
            "message": "job submitted",
            "created_at": now,
        }
        try:
            # Core statements, not the ORM's unit of work: submissions come in bursts and
            # this transaction holds the project's lock, so it is kept to its statements.
            with self._sessions.begin() as session:
                if quotas is not None and quotas.enabled:
                    earlier = self._check_quotas(session, project_id, quotas, idempotency_key)
                    if earlier is not None:
                        return self._replay(earlier, idempotency_key or "", fingerprint), False
                session.execute(insert(_jobs), row)
                event_id = session.execute(
                    insert(_events).returning(_events.c.id), submitted
                ).scalar_one()
                if spec.labels:
                    labels = [
                        {"job_id": job_id, "key": key, "value": value}
                        for key, value in spec.labels.items()
                    ]
                    session.execute(insert(_labels), labels)
                enqueue_state_change(
                    session,
                    project_id=project_id,
                    job_id=job_id,
                    job_name=spec.name,
                    labels=spec.labels,
                    event_id=event_id,
                    from_state=None,
                    to_state=JobState.QUEUED,
                    failure_kind=None,
                    message="job submitted",
                    at=now,
                )
        except IntegrityError:
            if idempotency_key is None:
                raise
            # A concurrent request with the same key won the insert.
            earlier = self._job_by_idempotency_key(project_id, idempotency_key)
            if earlier is None:
                raise
            return self._replay(earlier, idempotency_key, fingerprint), False
        event = EventRecord(
            id=event_id,
            job_id=job_id,
            kind=EVENT_TRANSITION,
            from_state=None,
            to_state=JobState.QUEUED,
            message="job submitted",
            created_at=now,
        )
        return JobRecord(
            id=job_id,
            project_id=project_id,
            name=spec.name,
            spec=spec,
            state=JobState.QUEUED,
            stage=None,
            progress={},
            metrics={},
            outputs={},
            failure_kind=None,
            message=None,
            attempt=0,
            lease_owner=None,
            lease_expires_at=None,
            dispatched_at=None,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
            transitions=(event,),
        ), True

    def get_job(self, project_id: str, job_id: str) -> JobRecord | None:
        """The job with its transitions, or None when it is not this project's.

        One statement (the job's row joined with its transitions) on the autocommit engine.
        """
        wanted = {"job_id": job_id, "project_id": project_id}
        rows = self._autocommit(
            lambda connection: connection.execute(JOB_WITH_TRANSITIONS, wanted).all()
        )
        return job_from_rows(rows)

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
        labels: Sequence[tuple[str, str]] = (),
    ) -> tuple[list[JobRecord], str | None]:
        """One page of the project's jobs, newest first, and the cursor of the next page
        (``JobFilter`` says how the filters apply). Raises ``InvalidCursor`` for a cursor this
        store did not produce. One statement on the autocommit engine."""
        page = JobFilter(
            states=tuple(states),
            name=name,
            created_after=created_after,
            created_before=created_before,
            labels=tuple(labels),
            cursor=cursor,
            limit=limit,
        )
        params = page.params(project_id)
        statement = page.statement()
        return page.page(
            self._autocommit(lambda connection: connection.execute(statement, params).all())
        )

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
        """Record that a message for the job was just sent (the reconciler's redispatch clock).

        One ``UPDATE`` (which takes the row lock itself), on the autocommit engine."""
        stamp = {"job_id": job_id, "dispatched_at": self._clock()}
        self._autocommit(lambda connection: connection.execute(_STAMP_DISPATCHED, stamp))

    def check_quotas(
        self, project_id: str, quotas: JobQuotas, idempotency_key: str | None = None
    ) -> None:
        """Raise ``QuotaExceeded`` if a new job of the project would go over ``quotas`` now,
        unless ``idempotency_key`` already names one of its jobs (a replay).

        A cheap early answer that takes no lock (one count, on the autocommit engine), so the
        API can refuse before it validates a spec; ``create_job`` checks again when it stores
        the job, which is what counts.
        """
        if not quotas.enabled:
            return
        if (
            idempotency_key is not None
            and self._job_by_idempotency_key(project_id, idempotency_key) is not None
        ):
            return
        wanted = {"project_id": project_id}
        counts: dict[str, int] = self._autocommit(
            lambda connection: _counts(connection.execute(_QUOTA_COUNTS, wanted))
        )
        _refuse_over_quota(counts, quotas)

    def _check_quotas(
        self, session: Session, project_id: str, quotas: JobQuotas, idempotency_key: str | None
    ) -> JobRecord | None:
        """Lock the project's row, then raise ``QuotaExceeded`` if a new job would go over
        ``quotas``. Returns the job an ``idempotency_key`` already made when a concurrent
        submission stored it while this one waited for the lock: that is a replay."""
        session.get(Project, project_id, with_for_update={"key_share": True})
        if idempotency_key is not None:
            earlier = session.scalars(
                select(Job).where(
                    Job.project_id == project_id, Job.idempotency_key == idempotency_key
                )
            ).one_or_none()
            if earlier is not None:
                return self._record_with_transitions(session, earlier)
        wanted = {"project_id": project_id}
        _refuse_over_quota(_counts(session.execute(_QUOTA_COUNTS, wanted)), quotas)
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
