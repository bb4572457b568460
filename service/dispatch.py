"""Handing jobs to the GPU workers through Celery, by task name only.

The API never imports ``workers``: it sends ``maskd.run_job`` by name to the queue its spec
routes it to (``queue_for``), and ``celery_config`` is the one place both sides take their
Celery settings from, so producer and consumer cannot disagree about the broker, queues or time
limits. Delivery is at-least-once; the store's lease makes a duplicate harmless, and the
reconciler re-sends what was lost.

Routing is a function of the spec alone: a job of N GPUs goes to the queue ``gpuN`` (one for
every N), everything else (one process, or CPU processes) to ``gpu``. A worker on a host with G
GPUs consumes ``gpu`` and ``gpu2`` to ``gpuG`` (``job_queues``), so a job reaches exactly the
hosts that can hold it. Exactly N rather than "the smallest configured queue that holds N" keeps
the API and the workers free of a queue table that both would have to agree on: no setting can
strand a job in a queue no worker reads, and the only setting left is the API's limit
(``Settings.max_job_gpus``). A CPU host has no GPUs to oversubscribe, so CPU processes
(``resources.processes``) go to ``gpu``, which every worker consumes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as BrokerError

from maskd_core.spec import MAX_WORLD_SIZE, JobSpec
from service.broker_queue import JOB_ID_HEADER, waiting_job_ids
from service.config import Settings
from service.store import JobRecord, JobStore

RUN_JOB_TASK = "maskd.run_job"
GPU_QUEUE = "gpu"
"""The queue of one-process jobs and of CPU processes; every worker consumes it."""
BROKER_CHECK_TIMEOUT_SECONDS = 3.0


def queue_for(spec: JobSpec) -> str:
    """The queue a job is sent to: ``gpuN`` for a job of N > 1 GPUs, else ``gpu``."""
    gpus = spec.resources.gpus
    return GPU_QUEUE if gpus is None or gpus == 1 else f"{GPU_QUEUE}{gpus}"


def job_queues(gpus: int = MAX_WORLD_SIZE) -> tuple[str, ...]:
    """The queues holding jobs that fit on ``gpus`` GPUs: ``gpu``, then ``gpu2`` to
    ``gpu<gpus>``; a worker with that many GPUs consumes them."""
    return (GPU_QUEUE, *(f"{GPU_QUEUE}{count}" for count in range(2, gpus + 1)))


ALL_JOB_QUEUES = job_queues()
"""Every queue a job can be sent to, which the reconciler reads before re-sending."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for the API (producer) and the workers (consumers).

    Long GPU jobs need: one reserved task per process (late ack + prefetch 1), no redelivery
    while a job still runs (visibility timeout above the hard time limit, set for the broker
    *and* the result backend, as Celery reads either), and no redelivery loop when a worker dies
    (``task_reject_on_worker_lost=False``; the reconciler re-queues from the database instead).
    Results live in the SQL store, so Celery keeps none.

    A pool process runs job after job rather than one job each (``worker_max_tasks_per_child``
    stays unset). Each process imports torch, the core and MLflow when it starts
    (``workers.observability``), seconds of work that a process per job would pay, after Celery
    noticed the old one exited (up to 5 s more), between every two jobs; a kept process takes
    the next message at once. What a fresh process gave for free is kept otherwise: every job
    seeds its RNGs and sets torch's threads itself, its MLflow client and database engine are
    its own, the CUDA cache is emptied after it (``workers.tasks``), and the CUDA context stays,
    which saves the next job creating it. Memory a job leaves behind is bounded by
    ``worker_max_memory_per_child`` (``Settings.worker_max_memory_per_child_mib``): after a job
    that took the process's peak resident memory above it, Celery replaces the process. A warm
    spare process would avoid that wait too, but would hold a second CUDA context and its own
    memory on every GPU for a case that rarely happens. A killed or crashed process is replaced
    as before; the lease, late acknowledgement and the reconciler do not depend on which
    process runs a job.

    Task events are on, on both sides (``task-sent`` from the API, ``task-received/started/
    succeeded/failed`` and heartbeats from the workers), so Flower or ``celery events`` show
    the jobs. They cost nothing stored: Redis carries them by publish/subscribe, and the
    filesystem broker drops them unless a monitor has bound a queue.

    For the embedded broker (``filesystem://``) the message folders under
    ``settings.broker_dir`` are created here, because kombu expects them to exist.
    """
    transport_options: dict[str, Any] = {
        "visibility_timeout": settings.broker_visibility_timeout_seconds,
    }
    if settings.uses_embedded_broker:
        queue_dir = embedded_queue_dir(settings)
        processed_dir = settings.broker_dir / "processed"
        control_dir = settings.broker_dir / "control"
        for folder in (queue_dir, processed_dir, control_dir):
            folder.mkdir(parents=True, exist_ok=True)
        transport_options |= {
            # One folder both ways: producers write where consumers read.
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed_dir),
            "control_folder": str(control_dir),
        }
    else:
        transport_options |= {
            "socket_connect_timeout": BROKER_CHECK_TIMEOUT_SECONDS,
            "socket_timeout": 30,
        }
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": dict(transport_options),
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "worker_max_memory_per_child": settings.worker_max_memory_per_child_mib * 1024 or None,
        "task_soft_time_limit": settings.job_soft_time_limit_seconds,
        "task_time_limit": settings.job_time_limit_seconds,
        "task_routes": {RUN_JOB_TASK: {"queue": GPU_QUEUE}},
        "task_default_queue": GPU_QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "enable_utc": True,
    }


def embedded_queue_dir(settings: Settings) -> Path:
    """The embedded broker's message folder: one file per undelivered message."""
    return settings.broker_dir / "queue"


def make_celery_app(settings: Settings, name: str = "maskd") -> Celery:
    """A Celery app configured by ``celery_config``, not set as the process's current app."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class NotDispatched(Exception):  # noqa: N818 - reads as the condition it reports
    """The broker refused a message: ``job_ids`` stay QUEUED and undispatched, for the
    reconciler to send once the broker is back."""

    def __init__(self, job_ids: list[str], cause: BrokerError | OSError) -> None:
        super().__init__(f"{len(job_ids)} job(s) not dispatched: {cause}")
        self.job_ids = job_ids
        self.cause = cause


class Dispatcher:
    """Sends jobs to the workers and records when, for the reconciler's redispatch clock."""

    def __init__(self, celery_app: Celery, store: JobStore) -> None:
        self._celery = celery_app
        self._store = store

    def send_job(self, job: JobRecord) -> None:
        """Publish one ``maskd.run_job`` message. Raises the broker's error when it is down;
        the job then stays QUEUED and undispatched, and the reconciler sends it later."""
        try:
            self.send_jobs([job])
        except NotDispatched as error:
            raise error.cause from error

    def send_jobs(self, jobs: Sequence[JobRecord]) -> None:
        """Publish a message per job to its queue (``queue_for`` its spec: the record, not an
        id, so that routing costs no read), then stamp those sent in one statement. Raises
        ``NotDispatched`` naming the jobs left unsent when the broker refuses one (the rest
        are not tried: a broker that is down stays down for the next)."""
        sent: list[str] = []
        try:
            for job in jobs:
                self._celery.send_task(
                    RUN_JOB_TASK,
                    args=[job.id],
                    queue=queue_for(job.spec),
                    headers={JOB_ID_HEADER: job.id},
                )
                sent.append(job.id)
        except (BrokerError, OSError) as error:
            raise NotDispatched([job.id for job in jobs[len(sent) :]], error) from error
        finally:
            self._store.mark_dispatched(sent)

    def waiting_job_ids(self, queues: Collection[str] = ALL_JOB_QUEUES) -> frozenset[str] | None:
        """Jobs whose message the broker still holds in ``queues`` (by default every queue a
        job can be sent to) or that a worker reserved (see ``service.broker_queue``)."""
        conf = self._celery.conf
        return waiting_job_ids(conf.broker_url, conf.broker_transport_options or {}, queues)

    def check_broker(self) -> None:
        """Raise when the broker cannot be reached (for readiness checks)."""
        with self._celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_CHECK_TIMEOUT_SECONDS)
