"""What the broker still holds, and the reconciler re-sending only what it lost.

On the embedded filesystem broker (one file per waiting message); Redis, with the messages a
worker reserved, is covered with a real worker in ``tests/workers/test_job_task.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from service_testkit import FakeClock, make_spec

from service.broker_queue import waiting_job_ids
from service.config import Settings
from service.dispatch import GPU_QUEUE, Dispatcher, embedded_queue_dir, make_celery_app
from service.store import JobStore
from workers.reconciler import reconcile_once


@pytest.fixture
def dispatcher(service_settings: Settings, clocked_store: JobStore) -> Iterator[Dispatcher]:
    celery_app = make_celery_app(service_settings, name="maskd-test-broker-queue")
    try:
        yield Dispatcher(celery_app, clocked_store)
    finally:
        celery_app.close()


def messages(settings: Settings) -> list[Path]:
    return sorted(embedded_queue_dir(settings).glob(f"*.{GPU_QUEUE}.msg"))


def test_the_broker_names_the_jobs_it_holds(
    dispatcher: Dispatcher, clocked_store: JobStore, service_settings: Settings
) -> None:
    project = clocked_store.create_project("acme")
    first, _ = clocked_store.create_job(project.id, make_spec("first"))
    second, _ = clocked_store.create_job(project.id, make_spec("second"))
    assert dispatcher.waiting_job_ids() == frozenset()

    dispatcher.send_job(first)
    dispatcher.send_job(second)
    dispatcher.send_job(second)
    assert dispatcher.waiting_job_ids() == {first.id, second.id}

    for path in messages(service_settings)[:1]:  # a worker took the oldest
        path.unlink()
    assert dispatcher.waiting_job_ids() == {second.id}


def test_a_broker_that_cannot_be_read_is_unknown_not_empty(tmp_path: Path) -> None:
    assert waiting_job_ids("amqp://guest@localhost//", {}, [GPU_QUEUE]) is None
    assert waiting_job_ids("redis://127.0.0.1:9/0", {}, [GPU_QUEUE]) is None
    assert waiting_job_ids("filesystem://", {}, [GPU_QUEUE]) is None
    garbage = tmp_path / f"1_x.{GPU_QUEUE}.msg"
    garbage.write_bytes(b"\x00not json")
    assert waiting_job_ids("filesystem://", {"data_folder_in": str(tmp_path)}, [GPU_QUEUE]) == (
        frozenset()
    )


def test_the_reconciler_resends_a_waiting_job_only_once_its_message_is_gone(
    dispatcher: Dispatcher,
    clocked_store: JobStore,
    clock: FakeClock,
    service_settings: Settings,
) -> None:
    project = clocked_store.create_project("acme")
    job, _ = clocked_store.create_job(project.id, make_spec())
    dispatcher.send_job(job)
    clock.advance(service_settings.redispatch_after_seconds + 1)  # a long queue ahead of it

    report = reconcile_once(clocked_store, dispatcher, service_settings, clock.now)
    assert (report.still_waiting, report.redispatched) == ([job.id], [])
    assert len(messages(service_settings)) == 1

    messages(service_settings)[0].unlink()  # lost: e.g. read by a worker killed at once
    report = reconcile_once(clocked_store, dispatcher, service_settings, clock.now)
    assert (report.still_waiting, report.redispatched) == ([], [job.id])
    assert len(messages(service_settings)) == 1
