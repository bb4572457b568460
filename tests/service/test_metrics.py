"""``GET /metrics``: the Prometheus families of the API, over the real database and app.

Jobs are put in their states through the store, as workers and the API would; the scrape is
parsed with prometheus-client's own parser, so the test reads what Prometheus would read.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_testkit import Api, FakeClock, make_spec, open_api

from service.config import Settings
from service.db import downgrade_to
from service.lifecycle import JobState
from service.store import JobStore


def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` (no API key sent), keyed by name and sorted labels."""
    response = api.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def new_job(store: JobStore, api: Api) -> str:
    job, _ = store.create_job(api.project.id, make_spec())
    return job.id


def claimed(store: JobStore, job_id: str, worker: str = "w1") -> None:
    assert store.claim(job_id, worker, lease_seconds=60) is not None


@pytest.fixture
def clocked_api(service_settings: Settings, clocked_store: JobStore) -> Iterator[Api]:
    """The app over the database ``clocked_store`` writes with a hand-moved clock."""
    with open_api(service_settings, clocked_store) as opened:
        yield opened


def test_jobs_per_state_and_queue_depth_are_read_from_the_database(api: Api) -> None:
    store = api.store
    for _ in range(3):
        new_job(store, api)
    stage1 = new_job(store, api)
    claimed(store, stage1)
    assert store.transition(stage1, JobState.STAGE1, worker_id="w1")
    stage2 = new_job(store, api)
    claimed(store, stage2)
    assert store.transition(stage2, JobState.STAGE2, worker_id="w1")
    store.request_cancel(api.project.id, new_job(store, api))
    failed = new_job(store, api)
    assert store.transition(failed, JobState.FAILED, worker_id=None)

    samples = scrape(api)

    assert value(samples, "maskd_database_up") == 1.0
    assert value(samples, "maskd_queue_depth") == 3.0
    expected = {"QUEUED": 3, "STAGE1": 1, "STAGE2": 1, "CANCELLED": 1, "FAILED": 1}
    for state in JobState:
        assert value(samples, "maskd_jobs", state=state.value) == expected.get(state.value, 0)

    store.request_cancel(api.project.id, stage1)  # STAGE1 -> CANCELLING
    samples = scrape(api)
    assert value(samples, "maskd_jobs", state="STAGE1") == 0.0
    assert value(samples, "maskd_jobs", state="CANCELLING") == 1.0


def test_stage_durations_and_claim_latency_come_from_job_event_times(
    clocked_api: Api, clock: FakeClock
) -> None:
    store = clocked_api.store
    job = new_job(store, clocked_api)  # QUEUED at t0
    clock.advance(2)
    claimed(store, job)  # claim latency 2 s
    clock.advance(1)
    assert store.transition(job, JobState.STAGE1, worker_id="w1")
    clock.advance(40)
    assert store.transition(job, JobState.STAGE2, worker_id="w1")  # stage1: 40 s
    clock.advance(100)
    assert store.transition(job, JobState.REGISTERING, worker_id="w1")  # stage2: 100 s

    samples = scrape(clocked_api)

    assert value(samples, "maskd_job_claim_latency_seconds_count") == 1.0
    assert value(samples, "maskd_job_claim_latency_seconds_sum") == 2.0
    assert value(samples, "maskd_job_claim_latency_seconds_bucket", le="1.0") == 0.0
    assert value(samples, "maskd_job_claim_latency_seconds_bucket", le="2.5") == 1.0
    stage = "maskd_job_stage_duration_seconds"
    assert value(samples, f"{stage}_count", stage="stage1") == 1.0
    assert value(samples, f"{stage}_sum", stage="stage1") == 40.0
    assert value(samples, f"{stage}_bucket", stage="stage1", le="30.0") == 0.0
    assert value(samples, f"{stage}_bucket", stage="stage1", le="60.0") == 1.0
    assert value(samples, f"{stage}_sum", stage="stage2") == 100.0
    assert value(samples, f"{stage}_count", stage="registering") == 0.0  # still in it

    # Later scrapes add only what happened since: REGISTERING ends, and a second job loses
    # its worker in STAGE1 and is claimed again after the reconciler re-queued it.
    clock.advance(5)
    assert store.transition(job, JobState.SUCCEEDED, worker_id="w1")
    lost = new_job(store, clocked_api)
    claimed(store, lost, worker="w2")  # latency 0 s
    assert store.transition(lost, JobState.STAGE1, worker_id="w2")
    clock.advance(90)  # the 60 s lease has lapsed
    assert store.requeue_expired(lost)  # stage1 visit: 90 s
    clock.advance(7)
    claimed(store, lost, worker="w3")  # latency 7 s, from the re-queue

    samples = scrape(clocked_api)

    assert value(samples, f"{stage}_count", stage="registering") == 1.0
    assert value(samples, f"{stage}_sum", stage="registering") == 5.0
    assert value(samples, f"{stage}_count", stage="stage1") == 2.0
    assert value(samples, f"{stage}_sum", stage="stage1") == 130.0
    assert value(samples, f"{stage}_count", stage="stage2") == 1.0
    assert value(samples, "maskd_job_claim_latency_seconds_count") == 3.0
    assert value(samples, "maskd_job_claim_latency_seconds_sum") == 9.0
    again = scrape(clocked_api)
    job_families = [key for key in samples if key[0].startswith("maskd_job")]
    assert [again[key] for key in job_families] == [samples[key] for key in job_families], (
        "a scrape without new events must not count anything twice"
    )


def test_a_new_api_process_reads_the_history_again(
    service_settings: Settings, clocked_store: JobStore, clock: FakeClock
) -> None:
    """The event-derived families survive a restart: a fresh app counts the same history."""
    with open_api(service_settings, clocked_store) as first:
        job = new_job(clocked_store, first)
        clock.advance(3)
        claimed(clocked_store, job)
        before = value(scrape(first), "maskd_job_claim_latency_seconds_sum")
    with open_api(service_settings, clocked_store) as second:
        assert value(scrape(second), "maskd_job_claim_latency_seconds_sum") == before == 3.0


def test_request_latency_is_labelled_by_route_template_not_url(api: Api) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for job_id in ids:
        assert api.http.get(f"/v1/jobs/{job_id}", headers=api.headers()).status_code == 404
    assert api.http.get("/v1/jobs", headers=api.headers()).status_code == 200
    assert api.http.get(f"/no/such/{ids[0]}").status_code == 404

    samples = scrape(api)
    count = "maskd_http_request_duration_seconds_count"

    job_route = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    assert value(samples, count, **job_route) == 3.0
    assert value(samples, count, method="GET", route="/v1/jobs", status="200") == 1.0
    assert value(samples, count, method="GET", route="unmatched", status="404") == 1.0
    labels = {value for (_, pairs) in samples for _, value in pairs}
    assert not any(job_id in label for job_id in ids for label in labels)
    assert value(samples, "maskd_http_request_duration_seconds_bucket", le="+Inf", **job_route)


def test_an_unreadable_database_is_reported_not_raised(api: Api) -> None:
    downgrade_to(api.settings.database_url, "base")  # the jobs table is gone

    samples = scrape(api)

    assert value(samples, "maskd_database_up") == 0.0
    assert not any(name == "maskd_jobs" for name, _ in samples)


@pytest.mark.slow
def test_registry_calls_of_the_api_are_counted_by_operation_and_outcome(api: Api) -> None:
    """Slow: the first registry call makes MLflow create its database."""
    assert api.http.get("/v1/models", headers=api.headers()).status_code == 200
    # A name outside the caller's project is refused before MLflow is asked.
    response = api.http.get("/v1/models/globex.student/versions", headers=api.headers())
    assert response.status_code == 404
    body = make_spec().model_dump(mode="json")
    body["teacher"]["weights"] = "models:/acme.nothing@champion"
    assert api.http.post("/v1/jobs", json=body, headers=api.headers()).status_code == 422
    assert (
        api.http.post(
            "/v1/jobs", json=make_spec().model_dump(mode="json"), headers=api.headers()
        ).status_code
        == 201
    )

    samples = scrape(api)

    operations = "maskd_registry_operations_total"
    assert value(samples, operations, operation="list_models", outcome="ok") == 1.0
    assert value(samples, operations, operation="list_versions", outcome="not_found") == 1.0
    assert value(samples, operations, operation="resolve_weights", outcome="invalid") == 1.0
    # A spec without registry weights asks the registry nothing.
    assert sum(v for (name, _), v in samples.items() if name == operations) == 3.0
