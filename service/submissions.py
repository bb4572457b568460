"""Storing and dispatching validated submissions in batches.

A submission's write is short, but it holds its project's row lock (the quota check), so a
burst of submissions used to wait for each other one transaction and several thread hops at a
time. Here every validated submission joins a queue, and one batch at a time is stored
(``JobStore.create_jobs``: one transaction per project in the batch) and sent to the workers
(``Dispatcher.send_jobs``), in one hop to the writer. Whatever arrives while a batch is being
written forms the next batch: a lone submission waits for nothing, and a burst of N costs a
handful of transactions rather than N.

An unreachable broker does not fail a submission: its job stays QUEUED, an event says so, and
the reconciler sends it once the broker is back.

Where the API validates in a pool of processes (``Settings.validation_processes`` above 0), the
batches are written by a process of their own too (``WriterProcess``), not by a thread of the
API process. A thread writing a batch (SQLAlchemy, then Celery's messages) held the interpreter
lock for most of its work, and the event loop, which gives the lock up at every socket wait,
waited up to the interpreter's switch interval (5 ms) to get it back each time: during a burst
of submissions every read took several such waits. The process is spawned once per API process
and shared by its apps; it keeps a store and a Celery app per configuration it is sent. A
writer process that dies costs the batch it held a 503 (``ValidationBusy``), as a validation
process does: whether its jobs were stored is then unknown, which a retry with the same
``Idempotency-Key`` settles. With ``validation_processes: 0`` everything stays in the API
process, and batches are written in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context

import anyio.to_thread
from celery import Celery
from sqlalchemy import Engine

from service.config import Settings
from service.db import make_autocommit_engine, make_engine, make_sessionmaker
from service.dispatch import Dispatcher, NotDispatched, make_celery_app
from service.store import JobQuotas, JobRecord, JobStore, NewJob, SubmissionOutcome
from service.validation_pool import ValidationBusy

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
    """Stores and dispatches submissions in batches; ``submit`` waits for its own batch.

    Batches are written in ``process`` when one is given (for ``settings``), else in a thread
    with ``store`` and ``dispatcher``.
    """

    def __init__(
        self,
        store: JobStore,
        dispatcher: Dispatcher,
        quotas: JobQuotas,
        process: WriterProcess | None = None,
        settings: Settings | None = None,
    ) -> None:
        if process is not None and settings is None:
            raise ValueError("a writer process is sent the settings it writes with")
        self._store = store
        self._dispatcher = dispatcher
        self._quotas = quotas
        self._process = process
        self._settings = settings
        self._waiting: list[_Waiting] = []
        self._writing: asyncio.Task[None] | None = None

    @property
    def quotas(self) -> JobQuotas:
        """The per-project quotas every submission is held to (from ``Settings``)."""
        return self._quotas

    async def submit(self, project_id: str, new_job: NewJob) -> tuple[JobRecord, bool]:
        """Store the job as QUEUED and send it (``JobStore.create_job``'s answer): ``(job,
        created)``. Raises ``IdempotencyConflict`` or ``QuotaExceeded``, and nothing is stored;
        ``ValidationBusy`` when the writer process died with this submission's batch.

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
            submissions = [(waiting.project_id, waiting.new_job) for waiting in batch]
            try:
                if self._process is not None and self._settings is not None:
                    outcomes = await self._process.write(self._settings, submissions, self._quotas)
                else:
                    outcomes = await anyio.to_thread.run_sync(
                        store_and_send, self._store, self._dispatcher, submissions, self._quotas
                    )
            except Exception as error:  # the database's: every submission of the batch hears it
                for waiting in batch:
                    waiting.outcome.set_exception(error)
                continue
            for waiting, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    waiting.outcome.set_exception(outcome)
                else:
                    waiting.outcome.set_result(outcome)


def store_and_send(
    store: JobStore,
    dispatcher: Dispatcher,
    submissions: Sequence[tuple[str, NewJob]],
    quotas: JobQuotas,
) -> list[SubmissionOutcome]:
    """Each project's submissions in one transaction, then the new jobs' messages; each
    submission's outcome, in order. Blocks: a thread's or the writer process's work."""
    positions: dict[str, list[int]] = defaultdict(list)
    for position, (project_id, _new_job) in enumerate(submissions):
        positions[project_id].append(position)
    outcomes: dict[int, SubmissionOutcome] = {}
    for project_id, indexes in positions.items():
        new_jobs = [submissions[index][1] for index in indexes]
        stored = store.create_jobs(project_id, new_jobs, quotas=quotas)
        outcomes.update(zip(indexes, stored, strict=True))
    created = [
        outcome[0]
        for outcome in outcomes.values()
        if not isinstance(outcome, Exception) and outcome[1]
    ]
    try:
        dispatcher.send_jobs(created)
    except NotDispatched as error:
        logger.error(
            "%d job(s) stored but not dispatched; the reconciler will retry: %s",
            len(error.job_ids),
            error.cause,
        )
        for job_id in error.job_ids:
            store.add_event(job_id, BROKER_DOWN_EVENT)
    return [outcomes[position] for position in range(len(submissions))]


KEPT_CONFIGURATIONS = 4
"""Stores (engines) and Celery apps a writer process keeps, one per configuration it was sent:
one in a deployment; tests build many apps, each on its own database."""


@dataclass
class _Opened:
    """In the writer process: what one configuration's batches are written with."""

    engine: Engine
    autocommit: Engine
    celery_app: Celery
    store: JobStore
    dispatcher: Dispatcher

    @classmethod
    def open(cls, settings: Settings) -> _Opened:
        engine = make_engine(settings.database_url)
        autocommit = make_autocommit_engine(settings.database_url)
        store = JobStore(make_sessionmaker(engine), autocommit=autocommit)
        celery_app = make_celery_app(settings, name="maskd-writer")
        return cls(engine, autocommit, celery_app, store, Dispatcher(celery_app, store))

    def close(self) -> None:
        self.celery_app.close()
        self.autocommit.dispose()
        self.engine.dispose()


_opened: OrderedDict[str, _Opened] = OrderedDict()
"""In the writer process: each configuration's ``_Opened``, latest used last."""


def _write_in_process(
    settings: Settings, submissions: list[tuple[str, NewJob]], quotas: JobQuotas
) -> list[SubmissionOutcome]:
    """In the writer process: ``store_and_send`` with this configuration's store and
    dispatcher, opened on first use."""
    key = settings.model_dump_json()
    if key in _opened:
        _opened.move_to_end(key)
    else:
        _opened[key] = _Opened.open(settings)
        while len(_opened) > KEPT_CONFIGURATIONS:
            _opened.popitem(last=False)[1].close()
    opened = _opened[key]
    return store_and_send(opened.store, opened.dispatcher, submissions, quotas)


def _ready() -> None:
    """A no-op task, so that the process starts (and imports the store) before any burst."""


class WriterProcess:
    """One spawned process writing this API process's batches (see the module's docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor = self._start()

    @staticmethod
    def _start() -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
        executor.submit(_ready)
        return executor

    async def write(
        self, settings: Settings, submissions: list[tuple[str, NewJob]], quotas: JobQuotas
    ) -> list[SubmissionOutcome]:
        """``store_and_send`` in the process; ``ValidationBusy`` if it died meanwhile."""
        with self._lock:
            executor = self._executor
        try:
            future = executor.submit(_write_in_process, settings, submissions, quotas)
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as error:
            with self._lock:
                if self._executor is executor:
                    self._executor = self._start()
            executor.shutdown(wait=False, cancel_futures=True)
            raise ValidationBusy(
                "the process storing this submission stopped; submit it again with the same "
                "Idempotency-Key (it returns the job if it was stored)"
            ) from error

    def shutdown(self) -> None:
        with self._lock:
            executor = self._executor
        executor.shutdown(wait=True, cancel_futures=True)


_shared: WriterProcess | None = None
_shared_lock = threading.Lock()


def shared_writer_process() -> WriterProcess:
    """This API process's writer process, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = WriterProcess()
        return _shared
