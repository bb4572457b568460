"""The API's hot reads from the event loop: a job and a page of jobs, each with its key check,
and a submission's key and quota check.

A read on the synchronous store costs two thread hops (FastAPI runs plain ``def`` handlers and
dependencies in its thread pool) and, per statement, SQLAlchemy's execution machinery, which
on this path costs several times the database's own work. ``JobReads`` keeps the statements
and the row readers of ``service.store._reads`` and changes only how they run:

- ``PostgresJobReads``: each statement is compiled once to PostgreSQL's SQL and sent through
  psycopg's asyncio driver from a small pool of autocommit connections, so a read never leaves
  the event loop.
- ``ThreadedJobReads``: any other database (SQLite, the embedded default) runs the same
  statements on the synchronous store, in one thread hop.

Either way a read is one statement, the key check included (``KEY_WITH_JOB``,
``JobFilter.statement_for_key``, ``KEY_WITH_QUOTA_USE``): the key is still read on every
request, so a revocation counts from the very next one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import anyio.to_thread
import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import ClauseElement
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import make_url

from service.store._reads import (
    KEY_WITH_JOB,
    KEY_WITH_QUOTA_USE,
    JobFilter,
    job_from_rows,
    key_params,
    project_for_key,
    submitter_for_key,
)
from service.store._records import JobQuotas, JobRecord, ProjectRecord, utcnow

if TYPE_CHECKING:
    from service.store import JobStore


class JobReads(Protocol):
    """The reads behind ``GET /v1/jobs/{id}`` and ``GET /v1/jobs``.

    Both check ``key`` first, exactly as ``JobStore.authenticate`` does: ``(None, …)`` for an
    unknown or wrong key, ``ApiKeyRevoked``/``ApiKeyExpired`` raised for a key that may no
    longer be used, and nothing of the project's read unless the key is good.
    """

    async def job(self, key: str, job_id: str) -> tuple[ProjectRecord | None, JobRecord | None]:
        """The key's project and its job ``job_id`` (None when it is not that project's)."""
        ...

    async def jobs(
        self, key: str, page: JobFilter
    ) -> tuple[ProjectRecord | None, list[JobRecord], str | None]:
        """The key's project, one page of its jobs and the next page's cursor. Raises
        ``InvalidCursor`` for a cursor the store did not produce."""
        ...

    async def submitter(
        self, key: str, idempotency_key: str | None, quotas: JobQuotas
    ) -> ProjectRecord | None:
        """The key's project, checked before a submission is validated: raises
        ``QuotaExceeded`` when the project may not take one more job now (unless
        ``idempotency_key`` already made one of its jobs)."""
        ...

    async def close(self) -> None: ...


class ThreadedJobReads:
    """``JobReads`` on the synchronous store (``job_for_key``, ``jobs_for_key``), one thread
    hop per read."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    async def job(self, key: str, job_id: str) -> tuple[ProjectRecord | None, JobRecord | None]:
        found: tuple[ProjectRecord | None, JobRecord | None] = await anyio.to_thread.run_sync(
            self._store.job_for_key, key, job_id
        )
        return found

    async def jobs(
        self, key: str, page: JobFilter
    ) -> tuple[ProjectRecord | None, list[JobRecord], str | None]:
        found: tuple[ProjectRecord | None, list[JobRecord], str | None]
        found = await anyio.to_thread.run_sync(self._store.jobs_for_key, key, page)
        return found

    async def submitter(
        self, key: str, idempotency_key: str | None, quotas: JobQuotas
    ) -> ProjectRecord | None:
        project: ProjectRecord | None = await anyio.to_thread.run_sync(
            self._store.submitter_for_key, key, idempotency_key, quotas
        )
        return project

    async def close(self) -> None:
        """The store's engines belong to the app, which disposes of them."""


class _Compiled:
    """A Core statement as PostgreSQL SQL with its fixed parameters (literals in the
    statement, such as the transition kind), compiled once."""

    _dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]

    def __init__(self, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=self._dialect)
        self.sql = str(compiled)
        self.fixed = dict(compiled.params)

    def params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.fixed, **given}


class PostgresJobReads:
    """``JobReads`` over psycopg's asyncio driver; see the module's docstring.

    Sessions run in UTC, so timestamps come back as aware UTC datetimes, as
    ``service.models.UTCDateTime`` gives them on the synchronous path. A statement that finds
    its pooled connection dropped (a database restart or failover) is retried once on a new
    one, as ``StoreBase._autocommit`` does; the pool discards the broken one.
    """

    def __init__(
        self, database_url: str, max_connections: int, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._clock = clock
        url = make_url(database_url).set(drivername="postgresql")
        # Every connection opened at start: one opened during a burst of submissions cost the
        # event loop milliseconds (and PostgreSQL a new backend) just when it had none to spare.
        self._pool = AsyncConnectionPool(
            url.render_as_string(hide_password=False),
            min_size=max_connections,
            max_size=max_connections,
            kwargs={"autocommit": True, "options": "-c TimeZone=UTC"},
            open=False,
        )
        self._key_with_job = _Compiled(KEY_WITH_JOB)
        self._key_with_quota_use = _Compiled(KEY_WITH_QUOTA_USE)
        self._pages: dict[Hashable, _Compiled] = {}

    async def open(self) -> None:
        await self._pool.open(wait=True)

    async def close(self) -> None:
        await self._pool.close()

    async def job(self, key: str, job_id: str) -> tuple[ProjectRecord | None, JobRecord | None]:
        params = self._key_with_job.params({**key_params(key), "job_id": job_id})
        rows = await self._fetch(self._key_with_job.sql, params)
        project = project_for_key(key, rows[0] if rows else None, self._clock())
        return project, None if project is None else job_from_rows(rows)

    async def submitter(
        self, key: str, idempotency_key: str | None, quotas: JobQuotas
    ) -> ProjectRecord | None:
        given = {**key_params(key), "idempotency_key": idempotency_key}
        rows = await self._fetch(
            self._key_with_quota_use.sql, self._key_with_quota_use.params(given)
        )
        return submitter_for_key(key, rows[0] if rows else None, self._clock(), quotas)

    async def jobs(
        self, key: str, page: JobFilter
    ) -> tuple[ProjectRecord | None, list[JobRecord], str | None]:
        params = page.params_for_key(key)
        compiled = self._pages.get(page.shape)
        if compiled is None:
            compiled = self._pages[page.shape] = _Compiled(page.statement_for_key())
        rows = await self._fetch(compiled.sql, compiled.params(params))
        project = project_for_key(key, rows[0] if rows else None, self._clock())
        if project is None:
            return None, [], None
        return project, *page.page(rows)

    async def _fetch(self, sql: str, params: dict[str, Any]) -> Sequence[Any]:
        try:
            return await self._fetch_once(sql, params)
        except psycopg.OperationalError:
            return await self._fetch_once(sql, params)

    async def _fetch_once(self, sql: str, params: dict[str, Any]) -> Sequence[Any]:
        async with self._pool.connection() as connection:
            cursor = connection.cursor(row_factory=namedtuple_row)
            await cursor.execute(sql, params, prepare=True)
            return await cursor.fetchall()


async def open_job_reads(database_url: str, store: JobStore, max_connections: int) -> JobReads:
    """The fastest ``JobReads`` for the database: ``PostgresJobReads`` for PostgreSQL, else
    ``ThreadedJobReads`` over ``store``."""
    if make_url(database_url).get_backend_name() == "postgresql":
        reads = PostgresJobReads(database_url, max_connections)
        await reads.open()
        return reads
    return ThreadedJobReads(store)
