"""The API's reads as statements and row readers, shared by both ways of running them.

The key check, the job read and the page of jobs are the API's hot path. They are written once
here, as prebuilt SQLAlchemy Core statements, and run either by the synchronous store (through
SQLAlchemy, any database) or by ``service.store._async_reads`` (compiled once to PostgreSQL's
SQL and sent straight through psycopg's asyncio driver). The rows they return are read back
into records by the functions here, whichever ran them, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    Table,
    and_,
    bindparam,
    exists,
    func,
    literal,
    or_,
    select,
    true,
)

from service import security
from service.lifecycle import RUNNING, JobState
from service.models import ApiKey, Job, JobEvent, JobLabel, Project
from service.store._records import (
    EVENT_TRANSITION,
    ApiKeyExpired,
    ApiKeyRevoked,
    JobQuotas,
    JobRecord,
    ProjectRecord,
    decode_cursor,
    encode_cursor,
    event_record,
    job_record,
)

_keys, _projects = cast(Table, ApiKey.__table__), cast(Table, Project.__table__)
_jobs, _events = cast(Table, Job.__table__), cast(Table, JobEvent.__table__)
_labels = cast(Table, JobLabel.__table__)

_EVENT_PREFIX = "event_"

_KEY_COLUMNS = (
    _keys.c.prefix.label("key_prefix"),
    _keys.c.key_hash.label("key_hash"),
    _keys.c.revoked_at.label("key_revoked_at"),
    _keys.c.expires_at.label("key_expires_at"),
    _projects.c.id.label("key_project_id"),
    _projects.c.name.label("key_project_name"),
    _projects.c.created_at.label("key_project_created_at"),
)
"""A key and its project, labelled so that they sit beside a job's own columns in one row."""
_EVENT_COLUMNS = tuple(column.label(_EVENT_PREFIX + column.name) for column in _events.c)
_KEYS_WITH_PROJECTS = _keys.join(_projects, _projects.c.id == _keys.c.project_id)
_JOBS_WITH_TRANSITIONS = _jobs.outerjoin(
    _events, and_(_events.c.job_id == _jobs.c.id, _events.c.kind == EVENT_TRANSITION)
)

KEY_BY_PREFIX = (
    select(*_KEY_COLUMNS)
    .select_from(_KEYS_WITH_PROJECTS)
    .where(_keys.c.prefix == bindparam("prefix"))
)
"""The key check's one statement: every authenticated request runs it."""

JOB_WITH_TRANSITIONS = (
    select(_jobs, *_EVENT_COLUMNS)
    .select_from(_JOBS_WITH_TRANSITIONS)
    .where(_jobs.c.id == bindparam("job_id"), _jobs.c.project_id == bindparam("project_id"))
    .order_by(_events.c.id)
)
"""A project's job and its transitions in one statement."""

KEY_WITH_JOB = (
    select(*_KEY_COLUMNS, _jobs, *_EVENT_COLUMNS)
    .select_from(
        _KEYS_WITH_PROJECTS.outerjoin(
            _JOBS_WITH_TRANSITIONS,
            and_(_jobs.c.project_id == _keys.c.project_id, _jobs.c.id == bindparam("job_id")),
        )
    )
    .where(_keys.c.prefix == bindparam("prefix"))
    .order_by(_events.c.id)
)
"""The key check and the read of one of its project's jobs in one round trip: no rows for an
unknown prefix; one row without a job (``id`` is NULL) when the job is not the project's; else
one row per transition. The key is still checked on every request, so a revocation counts from
the very next one."""

# Compared against when a key's prefix is unknown, so that case costs the same as a bad secret.
_UNKNOWN_KEY_HASH = security.hash_api_key("mk_unknown_unknown")


QUOTA_RUNNING_STATES = RUNNING | {JobState.CANCELLING}
"""The states that count against ``JobQuotas.max_running``: the job holds a worker."""
_QUEUED = JobState.QUEUED.value
_QUOTA_RUNNING = sorted(state.value for state in QUOTA_RUNNING_STATES)

QUOTA_COUNTS = (
    select(_jobs.c.state, func.count())
    .where(
        _jobs.c.project_id == bindparam("project_id"),
        _jobs.c.state.in_([_QUEUED, *_QUOTA_RUNNING]),
    )
    .group_by(_jobs.c.state)
)
"""A project's jobs per state that count against its quotas, in the submission's transaction."""


def quota_use(rows: Sequence[Any]) -> tuple[int, int]:
    """``(queued, running)`` from the rows of ``QUOTA_COUNTS``."""
    counts = {state: count for state, count in rows}
    return counts.get(_QUEUED, 0), sum(counts.get(state, 0) for state in _QUOTA_RUNNING)


def _project_jobs_where(*conditions: ColumnElement[bool]) -> ColumnElement[int]:
    return (
        select(func.count())
        .where(_jobs.c.project_id == _keys.c.project_id, *conditions)
        .scalar_subquery()
    )


KEY_WITH_QUOTA_USE = (
    select(
        *_KEY_COLUMNS,
        _project_jobs_where(_jobs.c.state == _QUEUED).label("queued_jobs"),
        # One bound value per state, not an expanding IN: ``_async_reads`` compiles it once.
        _project_jobs_where(_jobs.c.state.in_([literal(state) for state in _QUOTA_RUNNING])).label(
            "running_jobs"
        ),
        _project_jobs_where(_jobs.c.idempotency_key == bindparam("idempotency_key")).label(
            "replays"
        ),
    )
    .select_from(_KEYS_WITH_PROJECTS)
    .where(_keys.c.prefix == bindparam("prefix"))
)
"""A submission's first round trip: the key check, its project's quota use, and whether the
``Idempotency-Key`` already made one of its jobs (a replay, which no quota refuses)."""


def submitter_for_key(
    key: str, row: Any | None, now: datetime, quotas: JobQuotas
) -> ProjectRecord | None:
    """The project of ``key`` (``project_for_key``) given its row of ``KEY_WITH_QUOTA_USE``;
    raises ``QuotaExceeded`` when the project may not take one more job now. An early, lock-free
    answer, so a tenant at its quota costs no dry runs; storing the job checks again."""
    project = project_for_key(key, row, now)
    if project is not None and row is not None and not row.replays:
        quotas.refuse_one_more(row.queued_jobs, row.running_jobs)
    return project


def key_params(key: str) -> dict[str, str]:
    """The parameters of ``KEY_BY_PREFIX`` for ``key`` (a malformed key matches no row)."""
    return {"prefix": security.key_prefix(key) or ""}


def project_for_key(key: str, row: Any | None, now: datetime) -> ProjectRecord | None:
    """The project of ``key``, given its row of ``_KEY_COLUMNS`` (None: unknown prefix).

    None for an unknown, malformed or wrong key. A key whose secret matches but which was
    revoked or has expired raises ``ApiKeyRevoked`` or ``ApiKeyExpired``. Every path compares
    one hash, so the time taken does not tell an unknown prefix from a wrong secret.
    """
    if row is None:
        security.key_matches(key, _UNKNOWN_KEY_HASH)
        return None
    if not security.key_matches(key, row.key_hash):
        return None
    if row.key_revoked_at is not None:
        raise ApiKeyRevoked(row.key_prefix, row.key_revoked_at)
    if row.key_expires_at is not None and row.key_expires_at <= now:
        raise ApiKeyExpired(row.key_prefix, row.key_expires_at)
    return ProjectRecord(
        id=row.key_project_id, name=row.key_project_name, created_at=row.key_project_created_at
    )


def job_from_rows(rows: Sequence[Any]) -> JobRecord | None:
    """The job in the rows of ``JOB_WITH_TRANSITIONS`` or ``KEY_WITH_JOB``, if any."""
    if not rows or rows[0].id is None:
        return None
    transitions = tuple(
        event_record(row, prefix=_EVENT_PREFIX) for row in rows if row.event_id is not None
    )
    return job_record(rows[0], transitions)


@dataclass(frozen=True)
class JobFilter:
    """Which of a project's jobs a page lists, and where the page starts.

    Filters are part of the SQL query, so a page is always full when enough jobs match (unlike
    APIs that filter after limiting). ``name`` matches exactly; the time bounds are exclusive;
    each ``(key, value)`` of ``labels`` must be one of the job's labels (all of them: AND).
    """

    states: tuple[JobState, ...] = ()
    name: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    labels: tuple[tuple[str, str], ...] = ()
    cursor: str | None = None
    limit: int = 20

    @property
    def shape(self) -> tuple[int, bool, bool, bool, int, bool]:
        """Which filters are set (and how many states and labels): pages of one shape share
        one statement."""
        return (
            len(self.states),
            self.name is not None,
            self.created_after is not None,
            self.created_before is not None,
            len(self.labels),
            self.cursor is not None,
        )

    def statement(self) -> Select[Any]:
        """The page's statement (parameters: ``params``); one per shape, built once."""
        return _page_statement(*self.shape)

    def statement_for_key(self) -> Select[Any]:
        """The key check and the page of its project's jobs in one round trip (parameters:
        ``params_for_key``): no rows for an unknown prefix, else the key's columns on every
        row beside a job's (``id`` NULL on the one row of an empty page)."""
        return _page_for_key_statement(*self.shape)

    def params_for_key(self, key: str) -> dict[str, Any]:
        return {**self._filter_params(), **key_params(key)}

    def params(self, project_id: str) -> dict[str, Any]:
        """The statement's parameters. Raises ``InvalidCursor`` for a foreign cursor."""
        return {**self._filter_params(), "project_id": project_id}

    def _filter_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"rows": self.limit + 1}
        params.update({f"state_{i}": state.value for i, state in enumerate(self.states)})
        if self.name is not None:
            params["name"] = self.name
        if self.created_after is not None:
            params["created_after"] = self.created_after
        if self.created_before is not None:
            params["created_before"] = self.created_before
        for i, (key, value) in enumerate(self.labels):
            params[f"label_key_{i}"], params[f"label_value_{i}"] = key, value
        if self.cursor is not None:
            params["after_time"], params["after_id"] = decode_cursor(self.cursor)
        return params

    def page(self, rows: Sequence[Any]) -> tuple[list[JobRecord], str | None]:
        """The records of either statement's rows and the cursor of the next page, if any."""
        records = [job_record(row, ()) for row in rows[: self.limit] if row.id is not None]
        next_cursor = None
        if len(rows) > self.limit:
            last = records[-1]
            next_cursor = encode_cursor(last.created_at, last.id)
        return records, next_cursor


@lru_cache(maxsize=256)
def _page_for_key_statement(
    states: int, name: bool, after: bool, before: bool, labels: int, cursor: bool
) -> Select[Any]:
    project_of_key = (
        select(_keys.c.project_id).where(_keys.c.prefix == bindparam("prefix")).scalar_subquery()
    )
    page = _page_query(project_of_key, states, name, after, before, labels, cursor).subquery("page")
    return (
        select(*_KEY_COLUMNS, page)
        .select_from(_KEYS_WITH_PROJECTS.outerjoin(page, true()))
        .where(_keys.c.prefix == bindparam("prefix"))
        .order_by(page.c.created_at.desc(), page.c.id.desc())
    )


@lru_cache(maxsize=256)
def _page_statement(
    states: int, name: bool, after: bool, before: bool, labels: int, cursor: bool
) -> Select[Any]:
    return _page_query(bindparam("project_id"), states, name, after, before, labels, cursor)


def _page_query(
    project_id: ColumnElement[Any],
    states: int,
    name: bool,
    after: bool,
    before: bool,
    labels: int,
    cursor: bool,
) -> Select[Any]:
    query = select(_jobs).where(_jobs.c.project_id == project_id)
    if states:
        query = query.where(_jobs.c.state.in_([bindparam(f"state_{i}") for i in range(states)]))
    if name:
        query = query.where(_jobs.c.name == bindparam("name"))
    if after:
        query = query.where(_jobs.c.created_at > bindparam("created_after"))
    if before:
        query = query.where(_jobs.c.created_at < bindparam("created_before"))
    for i in range(labels):
        query = query.where(
            exists().where(
                _labels.c.job_id == _jobs.c.id,
                _labels.c.key == bindparam(f"label_key_{i}"),
                _labels.c.value == bindparam(f"label_value_{i}"),
            )
        )
    if cursor:
        after_time: BindParameter[datetime] = bindparam("after_time")
        after_id: BindParameter[str] = bindparam("after_id")
        query = query.where(
            or_(
                _jobs.c.created_at < after_time,
                and_(_jobs.c.created_at == after_time, _jobs.c.id < after_id),
            )
        )
    return query.order_by(_jobs.c.created_at.desc(), _jobs.c.id.desc()).limit(bindparam("rows"))
