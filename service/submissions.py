"""Storing and dispatching validated submissions in batches.

A submission's write is short, but it holds its project's row lock (the quota check), so a
burst of submissions used to wait for each other one transaction and several thread hops at a
time. Here every validated submission joins a queue, and one batch at a time is stored
(``JobStore.create_jobs``: one transaction per project in the batch) and sent to the workers
(``Dispatcher.send_jobs``), in one thread hop. Whatever arrives while a batch is being written
forms the next batch: a lone submission waits for nothing, and a burst of N costs a handful of
transactions rather than N.

An unreachable broker does not fail a submission: its job stays QUEUED, an event says so, and
the reconciler sends it once the broker is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import anyio.to_thread

from service.dispatch import Dispatcher, NotDispatched
from service.store import JobQuotas, JobRecord, JobStore, NewJob, SubmissionOutcome

logger = logging.getLogger(__name__)

MAX_BATCH = 200
"""Submissions per transaction at most: enough for any burst, small enough to keep the
project's lock for milliseconds."""
BROKER_DOWN_EVENT = "broker unreachable at submission; the job will be dispatched when it is back"


@dataclass
class _Waiting:
    project_id: str
    new_job: NewJob
    outcome: asyncio.Future[tuple[JobRecord, bool]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SubmissionWriter:
    """Stores and dispatches submissions in batches; ``submit`` waits for its own batch."""

    def __init__(self, store: JobStore, dispatcher: Dispatcher, quotas: JobQuotas) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._quotas = quotas
        self._waiting: list[_Waiting] = []
        self._writing: asyncio.Task[None] | None = None

    @property
    def quotas(self) -> JobQuotas:
        """The per-project quotas every submission is held to (from ``Settings``)."""
        return self._quotas

    async def submit(self, project_id: str, new_job: NewJob) -> tuple[JobRecord, bool]:
        """Store the job as QUEUED and send it (``JobStore.create_job``'s answer): ``(job,
        created)``. Raises ``IdempotencyConflict`` or ``QuotaExceeded``, and nothing is stored.

        The write goes on when the caller stops waiting (a client that hung up): its job is
        stored all the same, as it would be had the answer been lost on the way back.
        """
        waiting = _Waiting(project_id, new_job)
        self._waiting.append(waiting)
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write_waiting())
        return await asyncio.shield(waiting.outcome)

    async def _write_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                outcomes = await anyio.to_thread.run_sync(self._write, batch)
            except Exception as error:  # the database's: every submission of the batch hears it
                for waiting in batch:
                    waiting.outcome.set_exception(error)
                continue
            for waiting, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    waiting.outcome.set_exception(outcome)
                else:
                    waiting.outcome.set_result(outcome)

    def _write(self, batch: list[_Waiting]) -> list[SubmissionOutcome]:
        """In a thread: each project's submissions in one transaction, then the new jobs'
        messages."""
        positions: dict[str, list[int]] = defaultdict(list)
        for position, waiting in enumerate(batch):
            positions[waiting.project_id].append(position)
        outcomes: dict[int, SubmissionOutcome] = {}
        for project_id, indexes in positions.items():
            new_jobs = [batch[index].new_job for index in indexes]
            stored = self._store.create_jobs(project_id, new_jobs, quotas=self._quotas)
            outcomes.update(zip(indexes, stored, strict=True))
        created = [
            outcome[0]
            for outcome in outcomes.values()
            if not isinstance(outcome, Exception) and outcome[1]
        ]
        try:
            self._dispatcher.send_jobs(created)
        except NotDispatched as error:
            logger.error(
                "%d job(s) stored but not dispatched; the reconciler will retry: %s",
                len(error.job_ids),
                error.cause,
            )
            for job_id in error.job_ids:
                self._store.add_event(job_id, BROKER_DOWN_EVENT)
        return [outcomes[position] for position in range(len(batch))]
