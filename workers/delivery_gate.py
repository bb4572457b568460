"""Dropping, in the worker's parent, a delivery of a job that nobody may run.

Deliveries are at least once, so stale ones are routine: a job cancelled or finished while its
message waited, a redelivered message whose job another worker holds, a re-send by the
reconciler. Sent to the pool, each would occupy the pool process (the only one on a GPU
worker) for a task of its own, a database engine and a failed claim; after a burst of
cancelled jobs that queue drains slowly and delays real work.

So ``maskd.run_job`` uses ``JobDeliveryRequest``: before the parent hands a delivery to the pool
it reads the job row (``JobStore.claimable``, milliseconds) and, when no claim could succeed,
acknowledges the message and drops it there. Celery calls ``revoked()`` at exactly that point,
and a revoked request is what it already knows how to drop without the pool, so the check is
made there. The read is only a hint: when it says yes the child still claims by
compare-and-set, and when the database cannot be read the delivery goes to the pool as before.

The parent's engine has no pool of connections: nothing the children inherit at fork is open.
"""

from __future__ import annotations

import logging
import time
from functools import cache

from celery.worker.request import Request
from celery.worker.state import task_ready

from service.config import get_settings
from service.db import make_engine, make_sessionmaker
from service.logs import job_log_context
from service.store import JobStore

logger = logging.getLogger(__name__)


@cache
def _parent_store() -> JobStore:
    """One store for the parent's checks, made on the first delivery (not at import)."""
    engine = make_engine(get_settings().database_url, pooled=False)
    return JobStore(make_sessionmaker(engine))


class JobDeliveryRequest(Request):  # type: ignore[misc]  # Celery ships no type hints
    """A ``maskd.run_job`` delivery that drops itself when its job cannot be claimed."""

    _gate_passed = False

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if self._gate_passed:
            return False
        started = time.perf_counter()
        job_id = self._job_id()
        if job_id is None or self._claimable(job_id):
            self._gate_passed = True
            return False
        self._drop(job_id, started)
        return True

    def _job_id(self) -> str | None:
        args = self.args
        if isinstance(args, list | tuple) and len(args) == 1 and isinstance(args[0], str):
            return args[0]
        return None

    def _claimable(self, job_id: str) -> bool:
        try:
            return _parent_store().claimable(job_id)
        except Exception:
            logger.warning(
                "job %s: could not read the job in the worker's parent; delivering it anyway",
                job_id,
                exc_info=True,
            )
            return True

    def _drop(self, job_id: str, started: float) -> None:
        task_ready(self)
        self.acknowledge()
        self._already_revoked = True
        self.send_event("task-revoked", terminated=False, signum=None, expired=False)
        with job_log_context(job_id):
            logger.info(
                "job %s: delivery %s dropped before the pool (finished, cancelled or leased "
                "elsewhere) in %.1f ms",
                job_id,
                self.id,
                (time.perf_counter() - started) * 1000,
            )
        _count_skipped()


def _count_skipped() -> None:
    """Counted with the children's skips. Imported here, after the worker set up its
    metrics folder (``workers.metrics`` explains why the parent must not import it first)."""
    from workers import metrics

    metrics.DELIVERIES_SKIPPED.inc()
