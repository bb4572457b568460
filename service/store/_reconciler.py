"""The reconciler's side of the job table: find jobs nobody is driving and hand them back.

Kept apart from the worker methods because it acts on *other* workers' jobs, by the lease
clock alone: QUEUED jobs whose message was lost, and running jobs whose worker died.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select

from service.lifecycle import RUNNING, JobState
from service.models import Job
from service.store._base import StoreBase
from service.store._records import lease_live


class ReconcilerMixin(StoreBase):
    """``JobStore``'s methods for the reconciler."""

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
            if job is None or lease_live(job, now):
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
