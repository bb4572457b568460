"""The reconciler: puts lost jobs back on the queue.

The broker can lose a job two ways: a worker dies mid-run (its lease stops being renewed), or a
message vanishes before any worker took it (Redis restarted without persistence, a filesystem
message read by a worker killed before claiming). The database still knows both, so a periodic
pass over it re-dispatches them, each to the queue its spec routes it to (``gpu`` or ``gpuN``,
``service.dispatch``). A QUEUED job that only waits its turn behind a long queue looks the same to
the database, so the broker is asked first (``service.broker_queue``, every job queue at once)
and a job whose message it still holds is not sent twice. It is safe to run in several processes
and next to live workers: every worker claims a job by compare-and-set, so a superfluous message is
dropped. What it logs about a job carries the job's id, attempt and stage (``service.logs``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

from service.config import Settings
from service.dispatch import Dispatcher
from service.lifecycle import JobState
from service.logs import job_log_context
from service.store import JobStore
from service.webhooks import start_webhook_sender_thread
from workers.run_closer import close_runs_of_ended_jobs

logger = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """What one pass did, for logs and tests."""

    requeued: list[str] = field(default_factory=list)
    """Running jobs whose lease had expired, handed back to the queue."""
    redispatched: list[str] = field(default_factory=list)
    """Jobs whose message was sent to the broker again (including every requeued one)."""
    still_waiting: list[str] = field(default_factory=list)
    """QUEUED jobs that looked lost but whose message the broker still holds: not re-sent."""


def reconcile_once(
    store: JobStore, dispatcher: Dispatcher, settings: Settings, now: datetime | None = None
) -> ReconcileReport:
    report = ReconcileReport()
    waiting = _BrokerView(dispatcher)
    for job_id in store.find_orphans(now or datetime.now(UTC), settings.redispatch_after_seconds):
        with job_log_context(job_id) as log_context:
            try:
                job = store.get_job_unscoped(job_id)
                if job is None:
                    continue
                log_context.attempt, log_context.stage = job.attempt, job.stage
                if job.state == JobState.QUEUED and waiting.holds(job_id):
                    report.still_waiting.append(job_id)
                    continue
                if job.state != JobState.QUEUED:
                    # Lease expired: QUEUED again (resumes from its checkpoint), or a job lost
                    # while cancelling, which becomes CANCELLED and needs no message.
                    if not store.requeue_expired(job_id):
                        continue
                    report.requeued.append(job_id)
                    logger.info("reconciler: job %s lost its worker; re-queued", job_id)
                dispatcher.send_job(job)  # to the queue its spec routes it to, as before
            except Exception:
                # One broken job (or a broker blip) must not stop the others from recovering.
                logger.exception("reconciler: could not re-dispatch job %s", job_id)
                continue
            report.redispatched.append(job_id)
    if report.redispatched:
        logger.info(
            "reconciler: re-queued %s, re-dispatched %s", report.requeued, report.redispatched
        )
    return report


class _BrokerView:
    """The broker's waiting messages, read at most once per pass and only if a pass needs it."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._job_ids: frozenset[str] | None = None
        self._read = False

    def holds(self, job_id: str) -> bool:
        """True when the broker surely still has a message for ``job_id``."""
        if not self._read:
            self._job_ids = self._dispatcher.waiting_job_ids()
            self._read = True
        return self._job_ids is not None and job_id in self._job_ids


def run_reconciler(
    store: JobStore, dispatcher: Dispatcher, settings: Settings, stop: threading.Event
) -> None:
    """Reconciles every ``reconcile_interval_seconds`` until ``stop`` is set, and ends the
    MLflow runs that killed workers left open on jobs now over (``workers.run_closer``).

    Starts the webhook sender (``service.webhooks``) beside it, on its own thread and its own
    shorter interval, stopped by the same ``stop``: wherever the reconciler runs (``maskd
    serve``, ``maskd reconcile``, ``maskd demo``), the outbox is sent too."""
    start_webhook_sender_thread(store, settings, stop)
    while True:
        try:
            reconcile_once(store, dispatcher, settings)
        except Exception:
            logger.exception("reconciler pass failed; retrying next interval")
        # After the jobs: with MLflow away its client retries for minutes, which must not
        # delay re-queueing. It never raises.
        close_runs_of_ended_jobs(store, settings.mlflow_tracking_uri)
        if stop.wait(settings.reconcile_interval_seconds):
            return


def start_reconciler_thread(
    store: JobStore, dispatcher: Dispatcher, settings: Settings
) -> tuple[threading.Thread, threading.Event]:
    """Runs the reconciler beside the API in ``maskd serve``; set the event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=run_reconciler,
        args=(store, dispatcher, settings, stop),
        name="maskd-reconciler",
        daemon=True,
    )
    thread.start()
    return thread, stop
