"""The state every part of ``JobStore`` shares, and the writes more than one part needs.

The API (cancel), the workers (transition) and the reconciler (requeue) all change a job's
state, so the one place that writes a transition and its event (``_apply``), the row lock
(``_locked``) and the event/record helpers live here, on a base class every mixin extends:
all of them then use the same ``sessionmaker`` and the same clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service.lifecycle import TERMINAL, FailureKind, JobState
from service.models import Job, JobEvent
from service.store._outbox import StateChange, enqueue_state_change
from service.store._records import (
    EVENT_INFO,
    EVENT_TRANSITION,
    JobRecord,
    event_record,
    job_record,
    utcnow,
)

T = TypeVar("T")

_STAGE_OF_STATE = {
    JobState.STAGE1: "stage1",
    JobState.STAGE2: "stage2",
    JobState.REGISTERING: "registering",
}


class StoreBase:
    """One SQLAlchemy ``sessionmaker``, one engine for single statements and one clock, plus
    the helpers the mixins share.

    ``autocommit`` runs the API's hot work that is one statement (a key check, a job, a page
    of jobs, a quota count, the dispatch stamp): the API passes
    ``service.db.make_autocommit_engine``'s engine, which saves a transaction's round trips;
    by default those statements go through the sessions' engine.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Callable[[], datetime] = utcnow,
        *,
        autocommit: Engine | None = None,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        bind = sessions.kw["bind"]
        self._autocommit_engine: Engine = autocommit if autocommit is not None else bind

    def _autocommit(self, statement: Callable[[Connection], T]) -> T:
        """``statement`` on a pooled connection of the autocommit engine, retried once on a
        fresh one when the database dropped the first (a restart or failover), which that
        engine does not ping for. The statement is sent once unless the connection was lost
        before any answer, so a retried write (an idempotent stamp) is safe."""
        try:
            with self._autocommit_engine.begin() as connection:
                return statement(connection)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
        with self._autocommit_engine.begin() as connection:
            return statement(connection)

    @staticmethod
    def _locked(session: Session, job_id: str) -> Job | None:
        return session.get(Job, job_id, with_for_update=True)

    def _apply(
        self,
        session: Session,
        job: Job,
        target: JobState,
        message: str | None,
        failure_kind: FailureKind | None = None,
    ) -> None:
        """Write an allowed transition, its event and its webhook deliveries (the outbox), in
        the caller's transaction (the caller holds the row lock)."""
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
        event = self._add_event(
            session,
            job.id,
            message,
            kind=EVENT_TRANSITION,
            from_state=source,
            to_state=target,
            at=now,
        )
        change = StateChange(
            job_id=job.id,
            job_name=job.name,
            labels=job.spec.get("labels", {}),
            event_id=event.id,
            from_state=source,
            to_state=target,
            failure_kind=job.failure_kind if target == JobState.FAILED else None,
            message=message,
            at=now,
        )
        enqueue_state_change(session, job.project_id, change)

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
        return job_record(job, tuple(event_record(event) for event in events))
