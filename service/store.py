"""The job store: every read and write of job state goes through ``JobStore``.

The database is the source of truth; Celery only delivers messages, possibly twice. So every
change a worker makes is a compare-and-set inside one short transaction: the job row is locked
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite takes its write lock at ``BEGIN IMMEDIATE``),
the current state and lease owner are checked against ``service.lifecycle.ALLOWED``, and the
update plus its ``job_events`` row commit together. A duplicate delivery therefore finds the
lease taken and backs off instead of starting a second GPU run.

Methods return frozen records, never ORM objects, so no caller holds a session. Times are
aware UTC datetimes from the store's clock (injectable for tests); hosts running workers and
the reconciler are expected to keep their clocks in sync (NTP), since leases compare wall time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from maskd_core.spec import JobSpec
from service import security
from service.lifecycle import RUNNING, TERMINAL, FailureKind, JobState, can_transition
from service.models import ApiKey, Job, JobEvent, Project

EVENT_TRANSITION = "transition"
EVENT_INFO = "info"

_STAGE_OF_STATE = {
    JobState.STAGE1: "stage1",
    JobState.STAGE2: "stage2",
    JobState.REGISTERING: "registering",
}
_CANCEL_STATES = frozenset({JobState.CANCELLING, JobState.CANCELLED})
# Compared against when a key's prefix is unknown, so that case costs the same as a bad secret.
_UNKNOWN_KEY_HASH = security.hash_api_key("mk_unknown_unknown")


def utcnow() -> datetime:
    return datetime.now(UTC)


class StoreError(Exception):
    """Base class of the store's refusals; each message says what to do instead."""


class JobNotFound(StoreError):  # noqa: N818 - reads as the condition it reports
    """No such job in this project (other projects' jobs are deliberately indistinguishable)."""


class IdempotencyConflict(StoreError):  # noqa: N818 - named as the API reports it
    """An ``Idempotency-Key`` was reused with a different job spec."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for job {job_id} with a different "
            "spec; resend the original spec to get that job back, or use a new key for a "
            "new job"
        )
        self.key = key
        self.job_id = job_id


class JobAlreadyFinished(StoreError):  # noqa: N818 - reads as the condition it reports
    """The job is terminal (SUCCEEDED, CANCELLED or FAILED), so there is nothing to cancel."""

    def __init__(self, job_id: str, state: JobState) -> None:
        super().__init__(f"job {job_id} already finished ({state}); there is nothing to cancel")
        self.job_id = job_id
        self.state = state


class InvalidCursor(StoreError, ValueError):  # noqa: N818 - reads as the condition it reports
    """A list cursor that this store did not produce."""


@dataclass(frozen=True)
class ProjectRecord:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class EventRecord:
    """One history line: ``kind`` is "transition" (from_state/to_state set) or "info"."""

    id: int
    job_id: str
    kind: str
    from_state: JobState | None
    to_state: JobState | None
    message: str | None
    created_at: datetime


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one job.

    ``progress`` is ``{stage: {"step": int, "total": int}}``; ``metrics`` holds the latest value
    of each metric; ``transitions`` (state changes, oldest first) is filled by ``get_job`` and
    ``get_job_unscoped`` and left empty by ``list_jobs``.
    """

    id: str
    project_id: str
    name: str
    spec: JobSpec
    state: JobState
    stage: str | None
    progress: dict[str, dict[str, int]]
    metrics: dict[str, float]
    outputs: dict[str, Any]
    failure_kind: FailureKind | None
    message: str | None
    attempt: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    dispatched_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    transitions: tuple[EventRecord, ...] = field(default=())

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class HeartbeatResult:
    """``lease_held`` False means stop at once (the job was re-queued or given to another
    worker); ``cancel_requested`` means checkpoint, stop, and move the job to CANCELLED."""

    lease_held: bool
    cancel_requested: bool


def spec_fingerprint(spec: JobSpec) -> str:
    """A hash of the normalised spec: bodies differing only in spelled-out defaults match."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id]).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        when = datetime.fromisoformat(created_at)
    except (binascii.Error, ValueError, TypeError) as error:
        raise InvalidCursor(
            "cursor is not valid: pass the next_cursor of the previous page unchanged, or "
            "leave it out to start from the newest job"
        ) from error
    if when.tzinfo is None or not isinstance(job_id, str):
        raise InvalidCursor("cursor is not valid: pass the next_cursor of the previous page")
    return when, job_id


class JobStore:
    """Jobs, their events, projects and API keys over one SQLAlchemy ``sessionmaker``.

    Every public method is one short transaction, safe to call from many threads and processes.
    """

    def __init__(
        self, sessions: sessionmaker[Session], clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._sessions = sessions
        self._clock = clock

    # ---------------------------------------------------------------- projects and keys

    def create_project(self, name: str) -> ProjectRecord:
        """The project called ``name``, created if it does not exist yet."""
        existing = self._project_by_name(name)
        if existing is not None:
            return existing
        try:
            with self._sessions.begin() as session:
                project = Project(id=str(uuid.uuid4()), name=name, created_at=self._clock())
                session.add(project)
                return _project_record(project)
        except IntegrityError:
            # Created concurrently under the same name: that one is the project.
            raced = self._project_by_name(name)
            if raced is None:
                raise
            return raced

    def create_api_key(self, project_name: str) -> str:
        """A new key for the project (created if missing). The plaintext is returned once
        and only its hash is kept, so a lost key is replaced, never recovered."""
        project = self.create_project(project_name)
        generated = security.generate_api_key()
        with self._sessions.begin() as session:
            session.add(
                ApiKey(
                    id=str(uuid.uuid4()),
                    project_id=project.id,
                    prefix=generated.prefix,
                    key_hash=generated.key_hash,
                    created_at=self._clock(),
                )
            )
        return generated.plaintext

    def authenticate(self, key: str) -> ProjectRecord | None:
        """The project a key belongs to, or None for an unknown, malformed or wrong key."""
        prefix = security.key_prefix(key)
        with self._sessions.begin() as session:
            row = session.execute(
                select(ApiKey, Project)
                .join(Project, Project.id == ApiKey.project_id)
                .where(ApiKey.prefix == (prefix or ""))
            ).one_or_none()
        if row is None:
            security.key_matches(key, _UNKNOWN_KEY_HASH)
            return None
        api_key, project = row
        if not security.key_matches(key, api_key.key_hash):
            return None
        return _project_record(project)

    def get_project(self, project_id: str) -> ProjectRecord | None:
        """The project by id: workers need its name, the tenant key in MLflow's registry."""
        with self._sessions.begin() as session:
            project = session.get(Project, project_id)
            return None if project is None else _project_record(project)

    def _project_by_name(self, name: str) -> ProjectRecord | None:
        with self._sessions.begin() as session:
            project = session.scalars(select(Project).where(Project.name == name)).one_or_none()
            return None if project is None else _project_record(project)

    # ---------------------------------------------------------------- API side

    def create_job(
        self, project_id: str, spec: JobSpec, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Store a new QUEUED job; returns ``(job, created)``.

        With an ``idempotency_key`` already used in this project, the earlier job is returned
        (``created`` False) when the spec is the same, and ``IdempotencyConflict`` is raised
        when it differs. The caller dispatches only when ``created`` is True.
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
                record = _job_record(job, (_event_record(event),))
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
            records = [_job_record(job, ()) for job in jobs[:limit]]
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
            return [_event_record(event) for event in events]

    def mark_dispatched(self, job_id: str) -> None:
        """Record that a message for the job was just sent (the reconciler's redispatch clock)."""
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is not None:
                job.dispatched_at = self._clock()

    # ---------------------------------------------------------------- worker side

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
            if job is None:
                return None
            state = JobState(job.state)
            if state != JobState.QUEUED and state not in RUNNING:
                return None
            if _lease_live(job, now):
                return None
            job.lease_owner = worker_id
            job.lease_expires_at = now + timedelta(seconds=lease_seconds)
            job.attempt += 1
            job.updated_at = now
            self._add_event(
                session, job.id, f"claimed by worker {worker_id}, attempt {job.attempt}", at=now
            )
            return self._record_with_transitions(session, job)

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
            state = JobState(job.state)
            held = job.lease_owner == worker_id and state not in TERMINAL
            if held:
                job.lease_expires_at = now + timedelta(seconds=lease_seconds)
            return HeartbeatResult(lease_held=held, cancel_requested=state in _CANCEL_STATES)

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
        cannot overwrite the progress of the one that took over.
        """
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is None or job.lease_owner != worker_id:
                return
            job.progress = {**job.progress, stage: {"step": step, "total": total_steps}}
            job.metrics = {**job.metrics, **{key: float(value) for key, value in metrics.items()}}
            job.stage = stage
            job.updated_at = self._clock()

    def add_event(self, job_id: str, message: str, kind: str = EVENT_INFO) -> EventRecord:
        """Append a note to the job's history (e.g. "stage2 resumed at step 120 of 200")."""
        with self._sessions.begin() as session:
            return _event_record(self._add_event(session, job_id, message, kind=kind))

    def record_outputs(self, job_id: str, outputs: dict[str, Any]) -> None:
        """Merge artifact paths/links and result metrics into the job's outputs."""
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is not None:
                job.outputs = {**job.outputs, **outputs}
                job.updated_at = self._clock()

    def release_lease(self, job_id: str, worker_id: str) -> None:
        """Give up the lease if this worker still holds it (no-op otherwise)."""
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is not None and job.lease_owner == worker_id:
                job.lease_owner = None
                job.lease_expires_at = None

    # ---------------------------------------------------------------- reconciler side

    def find_orphans(self, now: datetime, redispatch_after_seconds: float) -> list[str]:
        """Ids of jobs that need the reconciler.

        QUEUED jobs that no worker holds and whose last dispatch (or creation, if never
        dispatched) is older than ``redispatch_after_seconds``: send them again. Running and
        CANCELLING jobs whose lease expired: pass them to ``requeue_expired``.
        """
        cutoff = now - timedelta(seconds=redispatch_after_seconds)
        lease_gone = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= now)
        stale_queued = and_(
            Job.state == JobState.QUEUED.value,
            func.coalesce(Job.dispatched_at, Job.created_at) < cutoff,
            lease_gone,
        )
        lost_running = and_(
            Job.state.in_([state.value for state in (*RUNNING, JobState.CANCELLING)]),
            lease_gone,
        )
        with self._sessions.begin() as session:
            return list(
                session.scalars(
                    select(Job.id)
                    .where(or_(stale_queued, lost_running))
                    .order_by(Job.created_at, Job.id)
                )
            )

    def requeue_expired(self, job_id: str) -> bool:
        """Hand a job whose worker died back to the queue; True when it is now QUEUED and
        should be dispatched again.

        Running + expired lease → QUEUED ("worker lost (lease expired); re-queued"); the next
        claim resumes from the stage checkpoint. CANCELLING + expired lease → CANCELLED, since
        nobody is left to stop (returns False). Anything else is left alone (False).
        """
        now = self._clock()
        with self._sessions.begin() as session:
            job = self._locked(session, job_id)
            if job is None or _lease_live(job, now):
                return False
            state = JobState(job.state)
            if state in RUNNING:
                self._apply(session, job, JobState.QUEUED, "worker lost (lease expired); re-queued")
                return True
            if state == JobState.CANCELLING:
                self._apply(
                    session, job, JobState.CANCELLED, "worker lost while cancelling; cancelled"
                )
            return False

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _locked(session: Session, job_id: str) -> Job | None:
        return session.get(Job, job_id, with_for_update=True)

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

    def _apply(
        self,
        session: Session,
        job: Job,
        target: JobState,
        message: str | None,
        failure_kind: FailureKind | None = None,
    ) -> None:
        """Write an allowed transition and its event (the caller holds the row lock)."""
        now = self._clock()
        source = JobState(job.state)
        job.state = target.value
        job.updated_at = now
        if target in _STAGE_OF_STATE:
            job.stage = _STAGE_OF_STATE[target]
            if job.started_at is None:
                job.started_at = now
        if target == JobState.FAILED:
            job.failure_kind = (failure_kind or FailureKind.INFRASTRUCTURE).value
        if message is not None:
            job.message = message
        if target in TERMINAL or target == JobState.QUEUED:
            job.lease_owner = None
            job.lease_expires_at = None
        if target in TERMINAL:
            job.finished_at = now
        self._add_event(
            session,
            job.id,
            message,
            kind=EVENT_TRANSITION,
            from_state=source,
            to_state=target,
            at=now,
        )

    def _add_event(
        self,
        session: Session,
        job_id: str,
        message: str | None,
        *,
        kind: str = EVENT_INFO,
        from_state: JobState | None = None,
        to_state: JobState | None = None,
        at: datetime | None = None,
    ) -> JobEvent:
        event = JobEvent(
            job_id=job_id,
            kind=kind,
            from_state=None if from_state is None else from_state.value,
            to_state=None if to_state is None else to_state.value,
            message=message,
            created_at=at or self._clock(),
        )
        session.add(event)
        session.flush()
        return event

    @staticmethod
    def _record_with_transitions(session: Session, job: Job) -> JobRecord:
        events = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job.id, JobEvent.kind == EVENT_TRANSITION)
            .order_by(JobEvent.id)
        )
        return _job_record(job, tuple(_event_record(event) for event in events))


def _lease_live(job: Job, now: datetime) -> bool:
    return (
        job.lease_owner is not None
        and job.lease_expires_at is not None
        and job.lease_expires_at > now
    )


def _project_record(project: Project) -> ProjectRecord:
    return ProjectRecord(id=project.id, name=project.name, created_at=project.created_at)


def _event_record(event: JobEvent) -> EventRecord:
    return EventRecord(
        id=event.id,
        job_id=event.job_id,
        kind=event.kind,
        from_state=None if event.from_state is None else JobState(event.from_state),
        to_state=None if event.to_state is None else JobState(event.to_state),
        message=event.message,
        created_at=event.created_at,
    )


def _job_record(job: Job, transitions: tuple[EventRecord, ...]) -> JobRecord:
    return JobRecord(
        id=job.id,
        project_id=job.project_id,
        name=job.name,
        spec=JobSpec.model_validate(job.spec),
        state=JobState(job.state),
        stage=job.stage,
        progress={stage: dict(values) for stage, values in job.progress.items()},
        metrics=dict(job.metrics),
        outputs=dict(job.outputs),
        failure_kind=None if job.failure_kind is None else FailureKind(job.failure_kind),
        message=job.message,
        attempt=job.attempt,
        lease_owner=job.lease_owner,
        lease_expires_at=job.lease_expires_at,
        dispatched_at=job.dispatched_at,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        transitions=transitions,
    )
