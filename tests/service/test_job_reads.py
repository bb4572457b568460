"""The API's hot reads (``JobReads``): the event-loop reads on PostgreSQL answer exactly what
the synchronous store answers, key checks included, for every shape of page."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from service_testkit import FakeClock, make_spec, store_on_clock
from sqlalchemy import text

from service.api.schemas import JobOut
from service.lifecycle import JobState
from service.store import (
    ApiKeyExpired,
    ApiKeyRevoked,
    InvalidCursor,
    JobFilter,
    JobReads,
    JobStore,
    encode_cursor,
)
from service.store._async_reads import PostgresJobReads, ThreadedJobReads

LEASE = 60.0
T = TypeVar("T")
Read = Callable[[JobReads], Coroutine[Any, Any, T]]


@pytest.fixture
def postgres_store(migrated_postgres_url: str, clock: FakeClock) -> Iterator[JobStore]:
    with store_on_clock(migrated_postgres_url, clock) as store:
        yield store


def both_reads(store: JobStore, url: str, clock: FakeClock) -> tuple[JobReads, JobReads]:
    return ThreadedJobReads(store), PostgresJobReads(url, max_connections=2, clock=clock)


def on_both(store: JobStore, url: str, clock: FakeClock, read: Read[T]) -> list[T]:
    return [run(reads, read) for reads in both_reads(store, url, clock)]


def seed(store: JobStore, clock: FakeClock) -> tuple[str, list[str]]:
    """A project's key and its jobs: one with several transitions, others in other states,
    names and labels; and another project's job."""
    key = store.create_api_key("readers")
    project = store.authenticate(key)
    assert project is not None
    ids = []
    for index in range(5):
        clock.advance(1)
        labels = {"team": "vision" if index % 2 else "speech", "run": str(index)}
        job, _ = store.create_job(project.id, make_spec(f"job-{index % 3}", labels=labels))
        ids.append(job.id)
    assert store.claim(ids[0], "w1", LEASE) is not None
    for state in (JobState.STAGE1, JobState.STAGE2):
        clock.advance(1)
        assert store.transition(ids[0], state, worker_id="w1", message=f"now {state.value}")
    store.request_cancel(project.id, ids[1])
    store.create_job(store.create_project("others").id, make_spec("elsewhere"))
    return key, ids


def read_job(key: str, job_id: str) -> Read[tuple[object, str | None]]:
    """The key's project and the job as the API would send it."""

    async def read(reads: JobReads) -> tuple[object, str | None]:
        project, job = await reads.job(key, job_id)
        return project, None if job is None else JobOut.from_record(job).model_dump_json()

    return read


def read_page(key: str, page: JobFilter) -> Read[tuple[object, list[str], str | None]]:
    """The key's project, the page's jobs as the API would send them, and the next cursor."""

    async def read(reads: JobReads) -> tuple[object, list[str], str | None]:
        project, jobs, next_cursor = await reads.jobs(key, page)
        return project, [JobOut.from_record(job).model_dump_json() for job in jobs], next_cursor

    return read


def run(reads: JobReads, read: Read[T]) -> T:
    """``read`` on ``reads`` in a loop of its own (a PostgreSQL pool opens in the loop that
    uses it, and is closed after)."""

    async def opened() -> T:
        if isinstance(reads, PostgresJobReads):
            await reads.open()
        try:
            return await read(reads)
        finally:
            await reads.close()

    return asyncio.run(opened())


@pytest.mark.postgres
@pytest.mark.slow
def test_event_loop_reads_answer_what_the_store_answers(
    postgres_store: JobStore, migrated_postgres_url: str, clock: FakeClock
) -> None:
    key, ids = seed(postgres_store, clock)
    project = postgres_store.authenticate(key)
    assert project is not None
    other_job = postgres_store.list_jobs(postgres_store.create_project("others").id)[0][0].id
    for job_id in [*ids, other_job, "no-such-job"]:
        answers = on_both(postgres_store, migrated_postgres_url, clock, read_job(key, job_id))
        assert answers[0] == answers[1], job_id
        assert answers[0][0] == project
        assert (answers[0][1] is not None) == (job_id in ids), job_id
    middle = postgres_store.get_job(project.id, ids[2])
    assert middle is not None
    pages = [
        JobFilter(),
        JobFilter(limit=2),
        JobFilter(states=(JobState.QUEUED,)),
        JobFilter(states=(JobState.STAGE2, JobState.CANCELLED)),
        JobFilter(name="job-1"),
        JobFilter(created_after=middle.created_at),
        JobFilter(created_before=middle.created_at),
        JobFilter(labels=(("team", "vision"),)),
        JobFilter(labels=(("team", "vision"), ("run", "3"))),
        JobFilter(labels=(("team", "nobody"),)),
        JobFilter(cursor=encode_cursor(middle.created_at, middle.id), limit=1),
    ]
    for page in pages:
        pages_read = on_both(postgres_store, migrated_postgres_url, clock, read_page(key, page))
        assert pages_read[0] == pages_read[1], page
        assert pages_read[0][1] or page.labels == (("team", "nobody"),), f"{page} found nothing"


@pytest.mark.postgres
@pytest.mark.slow
def test_event_loop_reads_check_the_key_like_the_store(
    postgres_store: JobStore, migrated_postgres_url: str, clock: FakeClock
) -> None:
    key, ids = seed(postgres_store, clock)
    expiring = postgres_store.create_api_key("readers", expires_at=clock() + timedelta(seconds=5))
    revoked = postgres_store.create_api_key("readers")
    postgres_store.revoke_api_key(revoked)
    wrong_secret = key[: key.rindex("_") + 1] + "not-the-secret"
    one_job, one_page = read_job(key, ids[0]), read_page(key, JobFilter())
    for bad in ("", "mk_", "Bearer x", wrong_secret, "mk_000000000000_unknown"):
        assert (
            on_both(postgres_store, migrated_postgres_url, clock, read_job(bad, ids[0]))
            == [(None, None)] * 2
        ), bad
        assert (
            on_both(postgres_store, migrated_postgres_url, clock, read_page(bad, JobFilter()))
            == [(None, [], None)] * 2
        ), bad
    refused = [
        (read_job(revoked, ids[0]), ApiKeyRevoked),
        (read_page(revoked, JobFilter()), ApiKeyRevoked),
        (read_page(key, JobFilter(cursor="not-a-cursor")), InvalidCursor),
    ]
    for read, error in refused:
        for reads in both_reads(postgres_store, migrated_postgres_url, clock):
            with pytest.raises(error):
                run(reads, read)
    assert on_both(postgres_store, migrated_postgres_url, clock, one_job)[0][1] is not None
    assert on_both(postgres_store, migrated_postgres_url, clock, one_page)[0][1]
    expires = read_job(expiring, ids[0])
    assert all(job for _, job in on_both(postgres_store, migrated_postgres_url, clock, expires))
    clock.advance(10)
    for reads in both_reads(postgres_store, migrated_postgres_url, clock):
        with pytest.raises(ApiKeyExpired):
            run(reads, expires)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_dropped_connection_costs_no_failed_read(
    postgres_store: JobStore, migrated_postgres_url: str, clock: FakeClock
) -> None:
    """The database closes the pool's connection (a restart, a failover): the next read is
    retried on a new connection instead of answering 500."""
    key, ids = seed(postgres_store, clock)
    reads = PostgresJobReads(migrated_postgres_url, max_connections=1, clock=clock)

    async def read_kill_read() -> tuple[object, object]:
        await reads.open()
        try:
            first = (await reads.job(key, ids[0]))[1]
            with postgres_store._sessions.begin() as session:
                session.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            second = (await reads.job(key, ids[0]))[1]
            return first, second
        finally:
            await reads.close()

    first, second = asyncio.run(read_kill_read())
    assert first is not None and first == second


def test_threaded_reads_serve_sqlite(sqlite_url: str, clock: FakeClock) -> None:
    with store_on_clock(sqlite_url, clock) as store:
        key, ids = seed(store, clock)
        reads = ThreadedJobReads(store)
        _, job = asyncio.run(reads.job(key, ids[0]))
        assert job is not None and [t.to_state for t in job.transitions][-2:] == [
            JobState.STAGE1,
            JobState.STAGE2,
        ]
        assert asyncio.run(reads.job(key, "no-such-job"))[1] is None
        _, jobs, next_cursor = asyncio.run(reads.jobs(key, JobFilter(limit=2)))
        assert len(jobs) == 2 and next_cursor is not None
        _, rest, _ = asyncio.run(reads.jobs(key, JobFilter(cursor=next_cursor)))
        assert [j.id for j in jobs + rest] == list(reversed(ids))
