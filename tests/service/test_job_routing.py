"""Multi-process jobs on the service side: the queue a job goes to, the reconciler re-sending it
there, the broker read across every queue, and the limits on GPUs and CPU processes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from service_testkit import Api, make_spec, open_api, spec_body

from maskd_core.spec import MAX_WORLD_SIZE
from service.config import Settings
from service.dispatch import (
    ALL_JOB_QUEUES,
    GPU_QUEUE,
    Dispatcher,
    embedded_queue_dir,
    job_queues,
    make_celery_app,
    queue_for,
)
from service.store import JobStore
from workers.reconciler import reconcile_once

FOUR_GPUS: dict[str, Any] = {"resources": {"gpus": 4}, "batch_size": 4}


def test_a_job_goes_to_the_queue_of_its_gpu_count() -> None:
    assert queue_for(make_spec()) == GPU_QUEUE == "gpu"
    assert queue_for(make_spec(resources={"gpus": 1})) == "gpu"
    assert queue_for(make_spec(**FOUR_GPUS)) == "gpu4"
    assert queue_for(make_spec(resources={"processes": 2})) == "gpu", "CPU processes: any worker"
    biggest = make_spec(resources={"gpus": MAX_WORLD_SIZE}, batch_size=MAX_WORLD_SIZE)
    assert queue_for(biggest) in ALL_JOB_QUEUES


def test_a_host_consumes_the_queues_of_the_jobs_it_can_hold() -> None:
    assert job_queues(0) == job_queues(1) == ("gpu",)
    assert job_queues(4) == ("gpu", "gpu2", "gpu3", "gpu4")
    assert len(ALL_JOB_QUEUES) == len(set(ALL_JOB_QUEUES)) == MAX_WORLD_SIZE


def test_more_gpus_than_the_largest_host_is_a_422_naming_the_field_and_setting(
    api: Api,
) -> None:
    response = api.http.post("/v1/jobs", json=spec_body(**FOUR_GPUS), headers=api.headers())

    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "resources", "gpus"]
    assert problem["type"] == "limit_exceeded"
    assert "resources.gpus is 4" in problem["msg"]
    assert "the 1 GPU(s) of the largest worker host" in problem["msg"]
    assert "MASKD_MAX_JOB_GPUS" in problem["msg"]
    assert api.queued_messages() == []


def test_more_cpu_processes_than_allowed_is_a_422_and_fewer_go_to_the_gpu_queue(
    api: Api,
) -> None:
    too_many = spec_body(resources={"processes": 5}, batch_size=10)
    response = api.http.post("/v1/jobs", json=too_many, headers=api.headers())
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "resources", "processes"]
    assert "MASKD_MAX_CPU_PROCESSES" in problem["msg"]

    two = spec_body(resources={"processes": 2}, batch_size=2)
    response = api.http.post("/v1/jobs", json=two, headers=api.headers())
    assert response.status_code == 201, response.text
    [message] = api.queued_messages()
    assert message.name.endswith(".gpu.msg")


def test_the_embedded_broker_is_read_across_every_queue(
    service_settings: Settings, job_store: JobStore
) -> None:
    celery_app = make_celery_app(service_settings, name="maskd-test-routing")
    dispatcher = Dispatcher(celery_app, job_store)
    try:
        project = job_store.create_project("acme")
        one, _ = job_store.create_job(project.id, make_spec("one"))
        four, _ = job_store.create_job(project.id, make_spec("four", **FOUR_GPUS))
        dispatcher.send_jobs([one, four])
        folder = embedded_queue_dir(service_settings)
        assert sorted(path.name.split(".", 1)[1] for path in folder.glob("*.msg")) == [
            "gpu.msg",
            "gpu4.msg",
        ]
        assert dispatcher.waiting_job_ids() == {one.id, four.id}
        assert dispatcher.waiting_job_ids(["gpu4"]) == {four.id}
    finally:
        celery_app.close()


@pytest.mark.redis
def test_a_four_gpu_job_waits_in_gpu4_and_the_reconciler_resends_it_there(
    service_settings: Settings, job_store: JobStore, redis_url: str
) -> None:
    settings = service_settings.model_copy(update={"broker_url": redis_url, "max_job_gpus": 4})
    with open_api(settings, job_store) as api:
        four = api.http.post("/v1/jobs", json=spec_body(**FOUR_GPUS), headers=api.headers())
        one = api.http.post("/v1/jobs", json=spec_body(), headers=api.headers())
        assert four.status_code == one.status_code == 201, (four.text, one.text)
    four_id, one_id = four.json()["id"], one.json()["id"]
    broker = redis.Redis.from_url(redis_url)
    celery_app = make_celery_app(settings, name="maskd-test-routing")
    dispatcher = Dispatcher(celery_app, job_store)
    try:
        assert (broker.llen("gpu4"), broker.llen("gpu")) == (1, 1)
        assert dispatcher.waiting_job_ids() == {four_id, one_id}

        later = datetime.now(UTC) + timedelta(seconds=settings.redispatch_after_seconds + 1)
        report = reconcile_once(job_store, dispatcher, settings, now=later)
        assert report.redispatched == [] and sorted(report.still_waiting) == sorted(
            [four_id, one_id]
        )

        broker.flushdb()  # both messages lost
        report = reconcile_once(job_store, dispatcher, settings, now=later)
        assert sorted(report.redispatched) == sorted([four_id, one_id])
        assert (broker.llen("gpu4"), broker.llen("gpu")) == (1, 1)
        assert dispatcher.waiting_job_ids(["gpu4"]) == {four_id}
    finally:
        celery_app.close()
        broker.close()
