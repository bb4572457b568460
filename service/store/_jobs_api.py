"""The API's side of the job table: submit, read, list, cancel, and the event history.

Everything here is scoped to one project (another project's job reads as "not found"), unlike
the worker and reconciler methods, which act on any job by id.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from maskd_core.spec import JobSpec
from service.lifecycle import RUNNING, TERMINAL, JobState
from service.models import Job, JobEvent, JobLabel, Project
from service.store._base import StoreBase
from service.store._outbox import (
    StateChange,
    insert_deliveries,
    project_endpoints,
    state_change_deliveries,
)
from service.store._reads import (
    JOB_WITH_TRANSITIONS,
    QUOTA_COUNTS,
    JobFilter,
    job_from_rows,
    quota_use,
)
from service.store._records import (
    EVENT_TRANSITION,
    EventRecord,
    IdempotencyConflict,
    JobAlreadyFinished,
    JobNotFound,
    JobQuotas,
    JobRecord,
    NewJob,
    QuotaExceeded,
    StoredJob,
    SubmissionOutcome,
    event_record,
    spec_fingerprint,
)

_jobs, _events = cast(Table, Job.__table__), cast(Table, JobEvent.__table__)
_labels = cast(Table, JobLabel.__table__)
_projects = cast(Table, Project.__table__)

_LOCK_PROJECT = (
    select(_projects.c.id)
    .where(_projects.c.id == bindparam("project_id"))
    .with_for_update(key_share=True)
)
"""The project's row lock that serialises its submissions' quota checks."""
_STAMP_DISPATCHED = (
    update(_jobs)
    .where(_jobs.c.id.in_(bindparam("job_ids", expanding=True)))
    .values(dispatched_at=bindparam("dispatched_at"))
)
SUBMITTED = "job submitted"


def _replay(earlier: JobRecord, key: str, fingerprint: str) -> SubmissionOutcome:
    """``earlier`` again when the spec is the same; an ``IdempotencyConflict`` when not."""
    if spec_fingerprint(earlier.spec) != fingerprint:
        return IdempotencyConflict(key, earlier.id)
    return earlier, False


@dataclass
class _NewRow:
    """A submission ``create_jobs`` stores: where it was in the batch, and its new job."""

    index: int
    job_id: str
    new_job: NewJob
    fingerprint: str
    event_id: int = 0

    def job_row(self, project_id: str, now: datetime) -> dict[str, object]:
        spec = self.new_job.spec
        return {
            "id": self.job_id,
            "project_id": project_id,
            "name": spec.name,
            "spec": spec.model_dump(mode="json"),
            "spec_hash": self.fingerprint,
            "idempotency_key": self.new_job.idempotency_key,
            "state": JobState.QUEUED.value,
            "stage": None,
            "progress": {},
            "metrics": {},
            "outputs": dict(self.new_job.outputs),
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

    def event_row(self, now: datetime) -> dict[str, object]:
        return {
            "job_id": self.job_id,
            "kind": EVENT_TRANSITION,
            "from_state": None,
            "to_state": JobState.QUEUED.value,
            "message": SUBMITTED,
            "created_at": now,
        }

    def submitted_change(self, event_id: int, now: datetime) -> StateChange:
        """The submission as a state change, for the project's webhooks."""
        spec = self.new_job.spec
        return StateChange(
            job_id=self.job_id,
            job_name=spec.name,
            labels=spec.labels,
            event_id=event_id,
            from_state=None,
            to_state=JobState.QUEUED,
            failure_kind=None,
            message=SUBMITTED,
            at=now,
        )

    def record(self, project_id: str, now: datetime) -> JobRecord:
        """The stored job as a read would return it."""
        submitted = EventRecord(
            id=self.event_id,
            job_id=self.job_id,
            kind=EVENT_TRANSITION,
            from_state=None,
            to_state=JobState.QUEUED,
            message=SUBMITTED,
            created_at=now,
        )
        return JobRecord(
            id=self.job_id,
            project_id=project_id,
            name=self.new_job.spec.name,
            spec=self.new_job.spec,
            state=JobState.QUEUED,
            stage=None,
            progress={},
            metrics={},
            outputs=dict(self.new_job.outputs),
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
            transitions=(submitted,),
        )


class JobsApiMixin(StoreBase):
    """``JobStore``'s methods for the HTTP API."""

    def create_job(
        self,
        project_id: str,
        spec: JobSpec,
        idempotency_key: str | None = None,
        *,
        quotas: JobQuotas | None = None,
    ) -> StoredJob:
        """Store a new QUEUED job; returns ``(job, created)``. ``create_jobs`` for one job,
        raising its refusal (``IdempotencyConflict``, ``QuotaExceeded``)."""
        (outcome,) = self.create_jobs(project_id, [NewJob(spec, idempotency_key)], quotas=quotas)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def create_jobs(
        self, project_id: str, new_jobs: Sequence[NewJob], *, quotas: JobQuotas | None = None
    ) -> list[SubmissionOutcome]:
        """Store a project's submissions as QUEUED jobs in one transaction; one outcome each,
        in order. The API stores whatever arrived while it wrote the previous batch together,
        so a burst pays for one lock, one count and one insert per table instead of one each.

        A submission whose ``idempotency_key`` already made a job of the project (earlier, or
        earlier in ``new_jobs``) is a replay: that job with ``created`` False when the spec is
        the same, ``IdempotencyConflict`` when it differs. The caller dispatches only what was
        created.

        With ``quotas``, a submission that would go over them is refused (``QuotaExceeded``)
        and the others are stored; a replay is never refused. The count and the inserts happen
        in one transaction holding the project's row lock (``SELECT ... FOR NO KEY UPDATE`` on
        PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers), so concurrent
        submissions cannot all slip under the quota.
        """
        try:
            return self._insert_jobs(project_id, new_jobs, quotas)
        except IntegrityError:
            if not any(new_job.idempotency_key for new_job in new_jobs):
                raise
        # A concurrent request (another API process) stored one of these keys first: the
        # rolled-back batch goes again, and now finds that job as a replay.
        return self._insert_jobs(project_id, new_jobs, quotas)

    def _insert_jobs(
        self, project_id: str, new_jobs: Sequence[NewJob], quotas: JobQuotas | None
    ) -> list[SubmissionOutcome]:
        keys = {new_job.idempotency_key for new_job in new_jobs} - {None}
        earlier = self._jobs_by_idempotency_keys(project_id, keys)
        now = self._clock()
        outcomes: list[SubmissionOutcome | None] = [None] * len(new_jobs)
        batch: list[_NewRow] = []
        made: dict[str, _NewRow] = {}
        # Core statements, not the ORM's unit of work: this transaction holds the project's
        # lock, so it is kept to a few statements whatever the batch's size.
        with self._sessions.begin() as session:
            queued = running = 0
            if quotas is not None and quotas.enabled:
                session.execute(_LOCK_PROJECT, {"project_id": project_id})
                # Keys stored by a concurrent submission while this one waited for the lock.
                earlier |= self._jobs_by_idempotency_keys(project_id, keys - set(earlier), session)
                queued, running = quota_use(
                    session.execute(QUOTA_COUNTS, {"project_id": project_id}).all()
                )
            for index, new_job in enumerate(new_jobs):
                key = new_job.idempotency_key
                fingerprint = spec_fingerprint(new_job.spec)
                if key is not None and key in earlier:
                    outcomes[index] = _replay(earlier[key], key, fingerprint)
                    continue
                if key is not None and key in made:
                    if made[key].fingerprint != fingerprint:
                        outcomes[index] = IdempotencyConflict(key, made[key].job_id)
                    continue
                if quotas is not None and quotas.enabled:
                    try:
                        quotas.refuse_one_more(queued, running)
                    except QuotaExceeded as refused:
                        outcomes[index] = refused
                        continue
                    queued += 1
                row = _NewRow(index, str(uuid.uuid4()), new_job, fingerprint)
                batch.append(row)
                if key is not None:
                    made[key] = row
            if batch:
                self._insert_rows(session, project_id, batch, now)
        records = {row.job_id: row.record(project_id, now) for row in batch}
        for row in batch:
            outcomes[row.index] = (records[row.job_id], True)
        for index, new_job in enumerate(new_jobs):
            if outcomes[index] is None:
                # A repeat of a key this batch stored: that job, as a replay.
                key = new_job.idempotency_key
                assert key is not None
                outcomes[index] = (records[made[key].job_id], False)
        return [outcome for outcome in outcomes if outcome is not None]

    @staticmethod
    def _insert_rows(
        session: Session, project_id: str, batch: Sequence[_NewRow], now: datetime
    ) -> None:
        """The jobs, their "submitted" transitions, labels and webhook deliveries: one insert
        per table."""
        session.execute(insert(_jobs), [row.job_row(project_id, now) for row in batch])
        event_ids = session.scalars(
            insert(_events).returning(_events.c.id, sort_by_parameter_order=True),
            [row.event_row(now) for row in batch],
        ).all()
        labels = [
            {"job_id": row.job_id, "key": key, "value": value}
            for row in batch
            for key, value in row.new_job.spec.labels.items()
        ]
        if labels:
            session.execute(insert(_labels), labels)
        endpoints = project_endpoints(session, project_id)
        deliveries = []
        for row, event_id in zip(batch, event_ids, strict=True):
            row.event_id = event_id
            deliveries += state_change_deliveries(endpoints, row.submitted_change(event_id, now))
        insert_deliveries(session, deliveries)

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

    def mark_dispatched(self, job_ids: Sequence[str]) -> None:
        """Record that a message for each job was just sent (the reconciler's redispatch
        clock). One ``UPDATE`` (which takes the rows' locks itself), on the autocommit engine."""
        if not job_ids:
            return
        stamp = {"job_ids": list(job_ids), "dispatched_at": self._clock()}
        self._autocommit(lambda connection: connection.execute(_STAMP_DISPATCHED, stamp))

    def _jobs_by_idempotency_keys(
        self, project_id: str, keys: set[str | None], session: Session | None = None
    ) -> dict[str, JobRecord]:
        """The project's jobs made by ``keys``, by key (in ``session``, or a transaction of
        its own)."""
        wanted = {key for key in keys if key is not None}
        if not wanted:
            return {}
        if session is None:
            with self._sessions.begin() as own:
                return self._jobs_by_idempotency_keys(project_id, keys, own)
        jobs = session.scalars(
            select(Job).where(Job.project_id == project_id, Job.idempotency_key.in_(wanted))
        )
        return {
            cast(str, job.idempotency_key): self._record_with_transitions(session, job)
            for job in jobs
        }
