"""What the store hands out and raises: frozen records, errors, cursors and ORM-to-record helpers.

Kept apart from the queries so every part of ``JobStore`` (and every caller) shares one
definition of a job, an event and a project snapshot, and so that no ORM object leaves the
store: the ``*_record`` helpers copy a row into a frozen dataclass while its session is open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row

from maskd_core.spec import JobSpec
from service import security
from service.lifecycle import TERMINAL, FailureKind, JobState
from service.models import ApiKey, Job, JobEvent, Project

EVENT_TRANSITION = "transition"
EVENT_INFO = "info"
CLAIM_EVENT_PREFIX = "claimed by worker "
KEY_DISPLAY_PREFIX = f"{security.KEY_SCHEME}_"
"""How a claim's event begins; ``service.metrics`` finds claims (claim latency) by it."""


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

    def __reduce__(self) -> tuple[type[IdempotencyConflict], tuple[str, str]]:
        # Rebuilt from its fields, as it crosses back from the submission writer's process.
        return type(self), (self.key, self.job_id)


class JobAlreadyFinished(StoreError):  # noqa: N818 - reads as the condition it reports
    """The job is terminal (SUCCEEDED, CANCELLED or FAILED), so there is nothing to cancel."""

    def __init__(self, job_id: str, state: JobState) -> None:
        super().__init__(f"job {job_id} already finished ({state}); there is nothing to cancel")
        self.job_id = job_id
        self.state = state


class InvalidCursor(StoreError, ValueError):  # noqa: N818 - reads as the condition it reports
    """A list cursor that this store did not produce."""


class ApiKeyNotFound(StoreError):  # noqa: N818 - reads as the condition it reports
    """No API key has this id or prefix."""

    def __init__(self, id_or_prefix: str) -> None:
        super().__init__(
            f"no API key with id or prefix {id_or_prefix!r}; `maskd admin list-keys` shows "
            "every key's id and prefix"
        )
        self.id_or_prefix = id_or_prefix


class ApiKeyRejected(StoreError):  # noqa: N818 - the base of the two refusals below
    """A correct key (the secret matched) that may no longer be used: revoked or expired.

    Raised only once the whole key matched, so guessing a prefix tells nothing about it.
    The message names the key's public prefix and when it ended, never its project.
    """

    def __init__(self, message: str, prefix: str, at: datetime) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.at = at


class ApiKeyRevoked(ApiKeyRejected):
    def __init__(self, prefix: str, revoked_at: datetime) -> None:
        super().__init__(
            f"API key {KEY_DISPLAY_PREFIX}{prefix} was revoked at {revoked_at.isoformat()}",
            prefix,
            revoked_at,
        )


class ApiKeyExpired(ApiKeyRejected):
    def __init__(self, prefix: str, expired_at: datetime) -> None:
        super().__init__(
            f"API key {KEY_DISPLAY_PREFIX}{prefix} expired at {expired_at.isoformat()}",
            prefix,
            expired_at,
        )


@dataclass(frozen=True)
class JobQuotas:
    """Per-project limits checked when a job is submitted; 0 means unlimited.

    ``max_queued``: jobs in QUEUED. ``max_running``: jobs holding a worker (STAGE1, STAGE2,
    REGISTERING, CANCELLING).
    """

    max_queued: int = 0
    max_running: int = 0

    @property
    def enabled(self) -> bool:
        return self.max_queued > 0 or self.max_running > 0

    def refuse_one_more(self, queued: int, running: int) -> None:
        """Raise ``QuotaExceeded`` when a project with ``queued`` and ``running`` jobs may not
        take one more."""
        if self.max_queued > 0 and queued >= self.max_queued:
            raise QuotaExceeded("queued_jobs", self.max_queued, queued)
        if self.max_running > 0 and running >= self.max_running:
            raise QuotaExceeded("running_jobs", self.max_running, running)


class QuotaExceeded(StoreError):  # noqa: N818 - reads as the condition it reports
    """A submission would go over one of the project's ``JobQuotas``; nothing was stored.

    ``quota`` is ``"queued_jobs"`` or ``"running_jobs"``; ``limit`` its value; ``current`` how
    many such jobs the project has now.
    """

    def __init__(self, quota: str, limit: int, current: int) -> None:
        what, until = (
            ("queued", "some of them start") if quota == "queued_jobs" else ("running", "one ends")
        )
        jobs = "job" if current == 1 else "jobs"
        super().__init__(
            f"quota reached: this project has {current} {what} {jobs} and may have at most "
            f"{limit}; wait until {until} (or cancel some), then submit again"
        )
        self.quota = quota
        self.limit = limit
        self.current = current

    def __reduce__(self) -> tuple[type[QuotaExceeded], tuple[str, int, int]]:
        # Rebuilt from its fields, as it crosses back from the submission writer's process.
        return type(self), (self.quota, self.limit, self.current)


@dataclass(frozen=True)
class ProjectRecord:
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKeyRecord:
    """What may be shown about an API key: never the secret, nor its hash."""

    id: str
    prefix: str
    project_id: str
    project_name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @property
    def display_prefix(self) -> str:
        """How the key begins, as its holder sees it (``mk_<prefix>``)."""
        return f"{KEY_DISPLAY_PREFIX}{self.prefix}"

    def status(self, now: datetime) -> str:
        """``"revoked"``, ``"expired"`` or ``"active"`` at ``now``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


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
    except (binascii.Error, ValueError, TypeError, RecursionError) as error:
        raise InvalidCursor(
            "cursor is not valid: pass the next_cursor of the previous page unchanged, or "
            "leave it out to start from the newest job"
        ) from error
    if when.tzinfo is None or not isinstance(job_id, str) or "\x00" in job_id:
        raise InvalidCursor("cursor is not valid: pass the next_cursor of the previous page")
    try:
        when = when.astimezone(UTC)  # as stored; a time beyond the year 9999 there cannot be
    except OverflowError:
        raise InvalidCursor(
            "cursor is not valid: pass the next_cursor of the previous page"
        ) from None
    return when, job_id


def lease_live(job: Job, now: datetime) -> bool:
    return (
        job.lease_owner is not None
        and job.lease_expires_at is not None
        and job.lease_expires_at > now
    )


def project_record(project: Project) -> ProjectRecord:
    return ProjectRecord(id=project.id, name=project.name, created_at=project.created_at)


def api_key_record(api_key: ApiKey, project: Project) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=api_key.id,
        prefix=api_key.prefix,
        project_id=project.id,
        project_name=project.name,
        created_at=api_key.created_at,
        expires_at=api_key.expires_at,
        revoked_at=api_key.revoked_at,
    )


def event_record(event: JobEvent | Row[Any], prefix: str = "") -> EventRecord:
    """The record of an ORM event, or of a row holding an event's columns with ``prefix`` on
    their names (a job's row joined with its transitions, whose own columns share names)."""

    def column(name: str) -> Any:
        return getattr(event, prefix + name)

    from_state, to_state = column("from_state"), column("to_state")
    return EventRecord(
        id=column("id"),
        job_id=column("job_id"),
        kind=column("kind"),
        from_state=None if from_state is None else JobState(from_state),
        to_state=None if to_state is None else JobState(to_state),
        message=column("message"),
        created_at=column("created_at"),
    )


SPEC_CACHE_SIZE = 4096
_specs_by_fingerprint: dict[str, JobSpec] = {}


def stored_spec(fingerprint: str, stored: dict[str, Any]) -> JobSpec:
    """The ``JobSpec`` of a stored job, validated once per process per fingerprint.

    A job's spec never changes after submission and ``spec_hash`` is the hash of exactly
    the stored JSON, so equal fingerprints mean equal specs (of any project: the cache
    holds nothing a key's holder does not already read from its own row). Validation is
    the dearest part of reading a job (a walk of every value plus pydantic's checks, some
    hundreds of microseconds); frozen specs are safe to share between threads. When full,
    the cache starts over rather than tracking recency: a miss costs one validation.
    """
    spec = _specs_by_fingerprint.get(fingerprint)
    if spec is None:
        spec = JobSpec.model_validate(stored)
        if len(_specs_by_fingerprint) >= SPEC_CACHE_SIZE:
            _specs_by_fingerprint.clear()
        _specs_by_fingerprint[fingerprint] = spec
    return spec


def job_record(job: Job | Row[Any], transitions: tuple[EventRecord, ...]) -> JobRecord:
    """The record of an ORM job or of a row of ``jobs``' columns (the autocommit engine's)."""
    return JobRecord(
        id=job.id,
        project_id=job.project_id,
        name=job.name,
        spec=stored_spec(job.spec_hash, job.spec),
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


@dataclass(frozen=True)
class NewJob:
    """A submission to store: its validated spec and the client's ``Idempotency-Key``, if any.

    ``outputs`` are what the job starts with: the pairing its dry run planned
    (``outputs.pairing``), or an estimate asked for at submission (``outputs.estimate``, which
    the worker completes with the actual times)."""

    spec: JobSpec
    idempotency_key: str | None = None
    outputs: Mapping[str, Any] = field(default_factory=dict)


StoredJob = tuple[JobRecord, bool]
"""A stored submission: the job, and whether this call created it (False: a replay)."""
SubmissionOutcome = StoredJob | IdempotencyConflict | QuotaExceeded
"""What ``JobStore.create_jobs`` made of one submission: stored, or refused with the reason."""
