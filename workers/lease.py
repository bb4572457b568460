"""The heartbeat that keeps a worker's lease on a job alive while the job trains.

The database, not the broker, decides who runs a job: a worker holds a lease that expires unless
renewed. A background thread renews it so the training loop never waits on SQL, and turns the
answers into a stop request the loop polls through ``should_stop``: the user asked to cancel,
the lease was lost (another worker may own the job now, so this one must stop writing to it),
or the job's time is up.

The time limit is enforced here, cooperatively, rather than by Celery's soft limit alone: a
``SoftTimeLimitExceeded`` lands wherever the process happens to be (possibly inside a library
that catches broad exceptions) and unwinds the stage without a checkpoint, while a stop polled
once per step always leaves one. Celery's limits stay as the backstop (see ``workers.app``).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum

from service.store import HeartbeatResult, JobStore

logger = logging.getLogger(__name__)


class StopReason(StrEnum):
    """Why a run must stop, in increasing precedence: a later reason replaces an earlier one."""

    TIME_LIMIT = "time_limit"
    CANCEL_REQUESTED = "cancel_requested"
    LEASE_LOST = "lease_lost"
    """Outranks everything: without the lease the worker may not even record the outcome."""


_PRECEDENCE = list(StopReason)


class LeaseKeeper:
    """Renews a job's lease every ``interval_seconds`` on a daemon thread.

    Between renewals it reads the job every ``poll_seconds`` (a read without a lock or a
    write), so a cancel reaches the training loop within ``poll_seconds`` plus one step
    rather than at the next renewal. A failing heartbeat (database briefly unreachable) is
    retried on the next tick; once no heartbeat has succeeded for ``lease_seconds`` the lease
    must be presumed expired and taken over, so the keeper reports it lost even though the
    database never said so. With ``time_limit_seconds`` it also asks the run to stop once
    that long has passed since ``start``.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        worker_id: str,
        *,
        lease_seconds: float,
        interval_seconds: float,
        poll_seconds: float | None = None,
        time_limit_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._interval_seconds = interval_seconds
        self._poll_seconds = min(poll_seconds or interval_seconds, interval_seconds)
        self._time_limit_seconds = time_limit_seconds
        self._clock = clock
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._stop_reason: StopReason | None = None
        # Run in a copy of the creator's context, so the heartbeat's log lines name the job
        # (service.logs.job_log_context) like the training loop's.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._run,),
            name=f"lease-{job_id}",
            daemon=True,
        )

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the job should stop, or None while it should keep going."""
        with self._lock:
            return self._stop_reason

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the heartbeat; the caller then releases the lease (or leaves it to expire)."""
        self._finished.set()
        self._thread.join(timeout=self._interval_seconds + 5.0)

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _set_reason(self, reason: StopReason) -> None:
        with self._lock:
            current = self._stop_reason
            if current is None or _PRECEDENCE.index(reason) > _PRECEDENCE.index(current):
                self._stop_reason = reason

    def _run(self) -> None:
        started = last_renewed = last_attempt = self._clock()
        while not self._finished.wait(self._poll_seconds):
            now = self._clock()
            limit = self._time_limit_seconds
            if limit is not None and now - started >= limit:
                self._set_reason(StopReason.TIME_LIMIT)
            if now - last_attempt < self._interval_seconds:
                if not self._keep_going(self._peek()):
                    return
                continue
            last_attempt = now
            try:
                result = self._store.heartbeat(self._job_id, self._worker_id, self._lease_seconds)
            except Exception:
                logger.warning("heartbeat for job %s failed", self._job_id, exc_info=True)
                if self._clock() - last_renewed >= self._lease_seconds:
                    logger.error(
                        "job %s: no heartbeat for %.1f s, presuming the lease lost",
                        self._job_id,
                        self._clock() - last_renewed,
                    )
                    self._set_reason(StopReason.LEASE_LOST)
                    return
                continue
            last_renewed = self._clock()
            if not self._keep_going(result):
                return

    def _peek(self) -> HeartbeatResult | None:
        """The job's lease and cancel flags between heartbeats; None when the read failed
        (the next heartbeat decides what an unreachable database means)."""
        try:
            return self._store.lease_status(self._job_id, self._worker_id)
        except Exception:
            logger.debug("lease status of job %s unreadable", self._job_id, exc_info=True)
            return None

    def _keep_going(self, result: HeartbeatResult | None) -> bool:
        """Turns an answer into a stop reason; False once the lease is lost for good."""
        if result is None:
            return True
        if not result.lease_held:
            logger.warning("job %s: lease lost to another worker, stopping", self._job_id)
            self._set_reason(StopReason.LEASE_LOST)
            return False
        if result.cancel_requested:
            self._set_reason(StopReason.CANCEL_REQUESTED)
        return True
