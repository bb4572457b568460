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

Layout: ``JobStore`` is assembled here from one mixin per caller, all sharing the session
factory, the clock and the transition writer of ``_base``: ``_projects`` (projects and API
keys: creation with an optional expiry, listing, revocation), ``_jobs_api`` (the API's
submit, with its per-project quotas, and read/list/cancel/events), ``_worker`` (claim,
heartbeat, transition, progress, outputs, release), ``_reconciler`` (orphans and expired
leases) and ``_webhooks`` (webhook endpoints, their delivery log, and the sender's claims; the
outbox rows themselves are written with each transition by ``_outbox``). The records, errors
and cursors they hand out are in ``_records``. The API's hot reads (the key check, a job, a
page of jobs) are statements in ``_reads``, which the store runs through SQLAlchemy and
``_async_reads`` runs from the event loop (``JobReads``). Import everything from
``service.store``; the private modules are not an interface.
"""

from __future__ import annotations

from service.store._async_reads import JobReads, open_job_reads
from service.store._jobs_api import JobsApiMixin
from service.store._outbox import (
    DELIVERY_DELIVERED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    EVENT_STATE_CHANGED,
)
from service.store._projects import ProjectsMixin
from service.store._reads import QUOTA_RUNNING_STATES, JobFilter
from service.store._reconciler import ReconcilerMixin
from service.store._records import (
    CLAIM_EVENT_PREFIX,
    EVENT_INFO,
    EVENT_TRANSITION,
    ApiKeyExpired,
    ApiKeyNotFound,
    ApiKeyRecord,
    ApiKeyRejected,
    ApiKeyRevoked,
    EventRecord,
    HeartbeatResult,
    IdempotencyConflict,
    InvalidCursor,
    JobAlreadyFinished,
    JobNotFound,
    JobQuotas,
    JobRecord,
    NewJob,
    ProjectRecord,
    QuotaExceeded,
    StoreError,
    SubmissionOutcome,
    decode_cursor,
    encode_cursor,
    spec_fingerprint,
    utcnow,
)
from service.store._webhooks import (
    DeliveryAttempt,
    DeliveryRecord,
    DueDelivery,
    WebhookLimitReached,
    WebhookNotFound,
    WebhookRecord,
    WebhooksMixin,
)
from service.store._worker import WorkerMixin

__all__ = [
    "CLAIM_EVENT_PREFIX",
    "DELIVERY_DELIVERED",
    "DELIVERY_FAILED",
    "DELIVERY_PENDING",
    "EVENT_INFO",
    "EVENT_STATE_CHANGED",
    "EVENT_TRANSITION",
    "QUOTA_RUNNING_STATES",
    "ApiKeyExpired",
    "ApiKeyNotFound",
    "ApiKeyRecord",
    "ApiKeyRejected",
    "ApiKeyRevoked",
    "DeliveryAttempt",
    "DeliveryRecord",
    "DueDelivery",
    "EventRecord",
    "HeartbeatResult",
    "IdempotencyConflict",
    "InvalidCursor",
    "JobAlreadyFinished",
    "JobFilter",
    "JobNotFound",
    "JobQuotas",
    "JobReads",
    "JobRecord",
    "JobStore",
    "NewJob",
    "ProjectRecord",
    "QuotaExceeded",
    "StoreError",
    "SubmissionOutcome",
    "WebhookLimitReached",
    "WebhookNotFound",
    "WebhookRecord",
    "decode_cursor",
    "encode_cursor",
    "open_job_reads",
    "spec_fingerprint",
    "utcnow",
]


class JobStore(ProjectsMixin, JobsApiMixin, WorkerMixin, ReconcilerMixin, WebhooksMixin):
    """Jobs, their events, projects, API keys and webhooks over one SQLAlchemy ``sessionmaker``.

    Every public method is one short transaction, safe to call from many threads and processes.
    Construct it as ``JobStore(sessions, clock=utcnow)``.
    """
