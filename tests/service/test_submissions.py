"""Submissions stored and sent in batches (``service.submissions``): a burst's outcomes are
each submission's own, as if it had been stored alone, and it costs a few transactions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator, Sequence

import pytest
from service_testkit import make_spec

from service.config import Settings
from service.dispatch import GPU_QUEUE, Dispatcher, embedded_queue_dir, make_celery_app
from service.store import (
    IdempotencyConflict,
    JobQuotas,
    JobStore,
    NewJob,
    QuotaExceeded,
    SubmissionOutcome,
)
from service.submissions import BROKER_DOWN_EVENT, SubmissionWriter, WriterProcess
from service.validation_pool import ValidationBusy


@pytest.fixture
def dispatcher(service_settings: Settings, job_store: JobStore) -> Iterator[Dispatcher]:
    celery_app = make_celery_app(service_settings, name="maskd-test-submissions")
    try:
        yield Dispatcher(celery_app, job_store)
    finally:
        celery_app.close()


def message_count(settings: Settings) -> int:
    """Messages waiting on the embedded broker (one file each)."""
    return len(list(embedded_queue_dir(settings).glob(f"*.{GPU_QUEUE}.msg")))


async def submit_all(
    writer: SubmissionWriter, submissions: Sequence[tuple[str, NewJob]]
) -> list[object]:
    return await asyncio.gather(
        *(writer.submit(project_id, new_job) for project_id, new_job in submissions),
        return_exceptions=True,
    )


def test_a_burst_gets_each_submissions_own_answer_in_a_few_transactions(
    job_store: JobStore,
    dispatcher: Dispatcher,
    service_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches: list[int] = []
    create_jobs = job_store.create_jobs

    def counted(
        project_id: str, new_jobs: Sequence[NewJob], *, quotas: JobQuotas | None = None
    ) -> list[SubmissionOutcome]:
        batches.append(len(new_jobs))
        return create_jobs(project_id, new_jobs, quotas=quotas)

    monkeypatch.setattr(job_store, "create_jobs", counted)
    acme, globex = job_store.create_project("acme"), job_store.create_project("globex")
    writer = SubmissionWriter(job_store, dispatcher, JobQuotas(max_queued=10))
    submissions = [(acme.id, NewJob(make_spec(f"acme-{index}"))) for index in range(12)]
    submissions += [
        (globex.id, NewJob(make_spec("same"), "key-1")),
        (globex.id, NewJob(make_spec("same"), "key-1")),
        (globex.id, NewJob(make_spec("other"), "key-1")),
    ]

    outcomes = asyncio.run(submit_all(writer, submissions))

    acme_outcomes, globex_outcomes = outcomes[:12], outcomes[12:]
    created = [outcome for outcome in acme_outcomes if isinstance(outcome, tuple)]
    assert len(created) == 10 and all(made for _, made in created)
    refused = [outcome for outcome in acme_outcomes if isinstance(outcome, QuotaExceeded)]
    assert [(error.quota, error.current) for error in refused] == [("queued_jobs", 10)] * 2
    first, replay, conflict = globex_outcomes
    assert isinstance(first, tuple) and isinstance(replay, tuple)
    assert (first[1], replay[1], replay[0].id) == (True, False, first[0].id)
    assert isinstance(conflict, IdempotencyConflict)

    new_ids = sorted([job.id for job, _ in created] + [first[0].id])
    assert dispatcher.waiting_job_ids() == set(new_ids), "every new job sent, replays not"
    assert message_count(service_settings) == len(new_ids), "each once"
    stored = job_store.list_jobs(acme.id, limit=100)[0] + job_store.list_jobs(globex.id)[0]
    assert sorted(job.id for job in stored) == new_ids
    assert all(job.dispatched_at is not None for job in stored)
    for job in stored:
        events = job_store.list_events(job.project_id, job.id)
        assert [event.message for event in events] == ["job submitted"]
    assert len(batches) < len(submissions) // 2, f"batches of {batches}"


def test_jobs_the_broker_refuses_stay_queued_with_an_event(
    job_store: JobStore, service_settings: Settings
) -> None:
    unreachable = service_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    celery_app = make_celery_app(unreachable, name="maskd-test-broker-down")
    project = job_store.create_project("acme")
    writer = SubmissionWriter(job_store, Dispatcher(celery_app, job_store), JobQuotas())
    try:
        outcomes = asyncio.run(
            submit_all(writer, [(project.id, NewJob(make_spec(f"j{i}"))) for i in range(3)])
        )
    finally:
        celery_app.close()
    jobs = [outcome[0] for outcome in outcomes if isinstance(outcome, tuple)]
    assert len(jobs) == 3
    for job in jobs:
        stored = job_store.get_job(project.id, job.id)
        assert stored is not None and stored.dispatched_at is None
        assert job_store.list_events(project.id, job.id)[-1].message == BROKER_DOWN_EVENT


def test_a_batch_writes_each_jobs_labels_and_webhook_delivery(job_store: JobStore) -> None:
    project = job_store.create_project("acme")
    webhook, _ = job_store.create_webhook(
        project.id, "https://hooks.example.com/maskd", None, max_per_project=5
    )
    new_jobs = [NewJob(make_spec(f"j{index}", labels={"index": str(index)})) for index in range(5)]

    outcomes = job_store.create_jobs(project.id, new_jobs)

    jobs = [outcome[0] for outcome in outcomes if isinstance(outcome, tuple)]
    assert [job.name for job in jobs] == [f"j{index}" for index in range(5)]
    for index, job in enumerate(jobs):
        [only] = job_store.list_jobs(project.id, labels=[("index", str(index))])[0]
        assert only.id == job.id
    deliveries = job_store.list_deliveries(project.id, webhook.id)[0]
    assert sorted(delivery.job_id for delivery in deliveries) == sorted(job.id for job in jobs)
    event_ids = {job.id: job.transitions[0].id for job in jobs}
    assert all(event_ids[job.id] > 0 for job in jobs), "each record carries its own event"
    assert len(set(event_ids.values())) == len(jobs)


@pytest.fixture
def writer_process() -> Iterator[WriterProcess]:
    process = WriterProcess()
    try:
        yield process
    finally:
        process.shutdown()


def test_a_writer_process_gives_each_submission_the_answer_a_thread_gives(
    job_store: JobStore, service_settings: Settings, writer_process: WriterProcess
) -> None:
    acme, globex = job_store.create_project("acme"), job_store.create_project("globex")
    celery_app = make_celery_app(service_settings, name="maskd-test-writer-process")
    writer = SubmissionWriter(
        job_store,
        Dispatcher(celery_app, job_store),
        JobQuotas(max_queued=3),
        process=writer_process,
        settings=service_settings,
    )
    submissions = [(acme.id, NewJob(make_spec(f"acme-{index}"))) for index in range(4)]
    submissions += [
        (globex.id, NewJob(make_spec("same"), "key-1")),
        (globex.id, NewJob(make_spec("same"), "key-1")),
        (globex.id, NewJob(make_spec("other"), "key-1")),
    ]
    try:
        outcomes = asyncio.run(submit_all(writer, submissions))
    finally:
        celery_app.close()

    created = [outcome for outcome in outcomes[:4] if isinstance(outcome, tuple)]
    [refused] = [outcome for outcome in outcomes[:4] if isinstance(outcome, QuotaExceeded)]
    assert len(created) == 3 and (refused.quota, refused.limit, refused.current) == (
        "queued_jobs",
        3,
        3,
    )
    first, replay, conflict = outcomes[4:]
    assert isinstance(first, tuple) and isinstance(replay, tuple)
    assert (first[1], replay[1], replay[0].id) == (True, False, first[0].id)
    assert isinstance(conflict, IdempotencyConflict)
    assert (conflict.key, conflict.job_id) == ("key-1", first[0].id)
    assert message_count(service_settings) == 4, "each new job sent once, by the process"
    stored = job_store.get_job(globex.id, first[0].id)
    assert stored is not None and stored.dispatched_at is not None


def test_a_writer_process_that_died_costs_its_batch_a_503_and_is_replaced(
    job_store: JobStore, service_settings: Settings, writer_process: WriterProcess
) -> None:
    project = job_store.create_project("acme")
    celery_app = make_celery_app(service_settings, name="maskd-test-writer-died")
    writer = SubmissionWriter(
        job_store,
        Dispatcher(celery_app, job_store),
        JobQuotas(),
        process=writer_process,
        settings=service_settings,
    )
    pid = writer_process._executor.submit(os.getpid).result()
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):  # the pool notices its process is gone
        writer_process._executor.submit(os.getpid).result(timeout=30)
    try:
        [lost] = asyncio.run(submit_all(writer, [(project.id, NewJob(make_spec("lost")))]))
        [kept] = asyncio.run(submit_all(writer, [(project.id, NewJob(make_spec("kept")))]))
    finally:
        celery_app.close()

    assert isinstance(lost, ValidationBusy) and "Idempotency-Key" in str(lost)
    assert isinstance(kept, tuple) and kept[1]
    assert job_store.get_job(project.id, kept[0].id) is not None
