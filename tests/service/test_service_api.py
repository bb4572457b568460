"""Contract tests of /v1/jobs and the probes, over real databases and a real broker."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from service_testkit import Api, FakeClock, LiveEventStream, make_spec, open_api, spec_body

from service.client import ApiError, MaskdClient
from service.config import Settings
from service.db import SchemaOutdatedError, downgrade_to
from service.dispatch import GPU_QUEUE
from service.lifecycle import JobState
from service.main import create_app
from service.store import JobStore


def job_ids(api: Api, **params: Any) -> list[str]:
    response = api.http.get("/v1/jobs", params=params, headers=api.headers())
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["data"]]


# ------------------------------------------------------------------------ submission


def test_submit_stores_the_job_and_sends_one_message(api: Api) -> None:
    response = api.http.post("/v1/jobs", json=spec_body("first"), headers=api.headers())
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["state"], job["name"], job["spec"]["stage1"]["iterations"]) == (
        "QUEUED",
        "first",
        4,
    )
    assert job["transitions"][0]["to_state"] == "QUEUED"
    assert job["links"]["self"] == f"/v1/jobs/{job['id']}"
    [message] = api.queued_messages()
    body = json.loads(message.read_text())
    assert body["headers"]["task"] == "maskd.run_job"
    assert json.loads(base64.b64decode(body["body"]))[0] == [job["id"]]
    stored = api.store.get_job(api.project.id, job["id"])
    assert stored is not None and stored.dispatched_at is not None

    fetched = api.http.get(f"/v1/jobs/{job['id']}", headers=api.headers()).json()
    assert fetched["id"] == job["id"] and fetched["spec"] == job["spec"]


def test_idempotency_key_replays_and_conflicts(api: Api) -> None:
    headers = {**api.headers(), "Idempotency-Key": "order-42"}
    first = api.http.post("/v1/jobs", json=spec_body(), headers=headers)
    replay = api.http.post("/v1/jobs", json=spec_body(), headers=headers)
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json()["id"] == first.json()["id"]
    conflict = api.http.post("/v1/jobs", json=spec_body("other"), headers=headers)
    assert conflict.status_code == 409
    assert "order-42" in conflict.json()["detail"] and "new key" in conflict.json()["detail"]
    assert len(job_ids(api)) == 1
    assert len(api.queued_messages()) == 1, "a replay is not dispatched again"


def test_structural_errors_are_422_with_readable_reasons(api: Api) -> None:
    body = spec_body()
    del body["teacher"]
    body["stage1"] = {"tokens": 0, "tokenz": 3}
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 422
    problems = {tuple(item["loc"]): item for item in response.json()["detail"]}
    assert problems[("body", "teacher")]["msg"] == "Field required"
    assert "greater than 0" in problems[("body", "stage1", "tokens")]["msg"]
    assert "unknown field" in problems[("body", "stage1", "tokenz")]["msg"]
    assert "body.teacher: Field required" in response.json()["message"]
    assert "input" not in problems[("body", "teacher")], "the body is not echoed back"
    assert job_ids(api) == [] and api.queued_messages() == []


def test_invalid_json_is_422(api: Api) -> None:
    response = api.http.post(
        "/v1/jobs",
        content=b"{not json",
        headers={**api.headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


def test_spec_validation_errors_are_422_and_nothing_is_stored(api: Api) -> None:
    body = spec_body(teacher={"arch": "seg_tiny_teacher", "layers": ["backbon"]})
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["type"] == "spec_error"
    assert problem["loc"] == ["body", "teacher", "layers[0]"]
    assert "backbon" in problem["msg"] and "backbone" in problem["msg"]
    unknown_arch = spec_body(student={"arch": "seg_tiny_studnet", "layers": ["backbone"]})
    response = api.http.post("/v1/jobs", json=unknown_arch, headers=api.headers())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["body", "student"]
    assert job_ids(api) == [] and api.queued_messages() == []


def test_an_unknown_method_inside_a_comparison_is_422_with_the_methods_that_exist(
    api: Api,
) -> None:
    body = {**spec_body(), "comparison": {"methods": ["maskd", "fitnett"], "seeds": [0, 1]}}
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "comparison", "methods[1]", "name"]
    assert "Did you mean 'fitnet'" in problem["msg"] and "mgd" in problem["msg"]
    assert job_ids(api) == [] and api.queued_messages() == []


def test_specs_cannot_read_other_projects_files_or_leave_the_input_roots(
    api: Api, tmp_path: Path
) -> None:
    """A spec naming a file in the data directory (another job's student, say) is refused
    before anything opens it, as is a path outside MASKD_INPUT_ROOTS when that is set."""
    stolen = api.settings.jobs_dir / "someone-elses-job" / "student.pt"
    body = spec_body(
        teacher={"arch": "seg_tiny_teacher", "layers": ["backbone"], "weights": str(stolen)}
    )
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "teacher", "weights"]
    assert "data directory" in problem["msg"]
    assert str(api.settings.project_inputs_dir("acme").resolve()) in problem["msg"]
    folder = {"name": "image_folder", "args": {"root": "/etc", "num_classes": 2}}
    restricted = api.settings.model_copy(update={"input_roots": [tmp_path]})
    with open_api(restricted, api.store) as guarded:
        response = guarded.http.post(
            "/v1/jobs", json=spec_body(dataset=folder), headers=guarded.headers()
        )
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "dataset", "args", "root"]
    assert "MASKD_INPUT_ROOTS" in problem["msg"]
    assert job_ids(api) == [] and api.queued_messages() == []


def test_submission_survives_an_unreachable_broker(
    service_settings: Settings, job_store: JobStore
) -> None:
    settings = service_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with open_api(settings, job_store) as api:
        response = api.http.post("/v1/jobs", json=spec_body(), headers=api.headers())
    assert response.status_code == 201, response.text
    job = job_store.get_job(api.project.id, response.json()["id"])
    assert job is not None and job.state == JobState.QUEUED and job.dispatched_at is None
    events = job_store.list_events(api.project.id, job.id)
    assert "broker unreachable" in (events[-1].message or "")


@pytest.mark.redis
def test_submit_sends_to_the_redis_gpu_queue(
    service_settings: Settings, job_store: JobStore, redis_url: str
) -> None:
    settings = service_settings.model_copy(update={"broker_url": redis_url})
    with open_api(settings, job_store) as api:
        response = api.http.post("/v1/jobs", json=spec_body(), headers=api.headers())
        assert response.status_code == 201, response.text
    broker = redis.Redis.from_url(redis_url)
    try:
        assert broker.llen(GPU_QUEUE) == 1
        message = json.loads(broker.lindex(GPU_QUEUE, 0) or b"{}")
    finally:
        broker.close()
    assert message["headers"]["task"] == "maskd.run_job"
    assert message["headers"]["argsrepr"] == repr([response.json()["id"]])


# ------------------------------------------------------------------------ auth and tenants


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer mk_0000_nope", "Bearer not-a-key", "Basic dXNlcjpwYXNz"],
    ids=["missing", "unknown", "malformed", "basic"],
)
def test_requests_without_a_valid_key_are_401(api: Api, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x")]:
        response = api.http.request(method, path, headers=headers, json=spec_body())
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "maskd admin create-key --project NAME" in response.json()["detail"]


def test_other_projects_jobs_are_invisible(api: Api) -> None:
    job, _ = api.store.create_job(api.project.id, make_spec())
    other = api.headers(api.other_key)
    base = f"/v1/jobs/{job.id}"
    for method, path in [
        ("GET", base),
        ("POST", f"{base}/cancel"),
        ("GET", f"{base}/events"),
        ("GET", f"{base}/events/stream"),
    ]:
        response = api.http.request(method, path, headers=other)
        assert response.status_code == 404, (method, path)
        assert "GET /v1/jobs" in response.json()["detail"]
    assert api.http.get("/v1/jobs", headers=other).json()["data"] == []
    still = api.store.get_job(api.project.id, job.id)
    assert still is not None and still.state == JobState.QUEUED


# ------------------------------------------------------------------------ cancel


def test_cancel_a_queued_job_then_again(api: Api) -> None:
    job = api.http.post("/v1/jobs", json=spec_body(), headers=api.headers()).json()
    response = api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    assert response.status_code == 202
    assert response.json()["state"] == "CANCELLED"
    assert [t["to_state"] for t in response.json()["transitions"]] == ["QUEUED", "CANCELLED"]
    again = api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    assert again.status_code == 409
    assert "already finished (CANCELLED)" in again.json()["detail"]


def test_cancel_a_running_job_asks_its_worker(api: Api) -> None:
    job, _ = api.store.create_job(api.project.id, make_spec())
    api.store.claim(job.id, "w1", 60)
    api.store.transition(job.id, JobState.STAGE1, worker_id="w1")
    response = api.http.post(f"/v1/jobs/{job.id}/cancel", headers=api.headers())
    assert (response.status_code, response.json()["state"]) == (202, "CANCELLING")
    assert api.store.heartbeat(job.id, "w1", 60).cancel_requested
    api.store.transition(job.id, JobState.CANCELLED, worker_id="w1")
    assert api.http.post(f"/v1/jobs/{job.id}/cancel", headers=api.headers()).status_code == 409


def test_cancel_an_unknown_job_is_404(api: Api) -> None:
    response = api.http.post("/v1/jobs/does-not-exist/cancel", headers=api.headers())
    assert response.status_code == 404


# ------------------------------------------------------------------------ listing


@pytest.fixture
def seeded(api: Api, clocked_store: JobStore, clock: FakeClock) -> tuple[Api, list[str]]:
    """Nine jobs one minute apart, names a,b,b,a,b,b,...; returns their ids oldest first."""
    ids = []
    for index in range(9):
        clock.advance(60)
        name = "a" if index % 3 == 0 else "b"
        ids.append(clocked_store.create_job(api.project.id, make_spec(name))[0].id)
    return api, ids


def test_list_pages_through_filtered_jobs(seeded: tuple[Api, list[str]]) -> None:
    api, ids = seeded
    seen: list[str] = []
    params: dict[str, Any] = {"name": "a", "limit": 2}
    pages = 0
    while True:
        page = api.http.get("/v1/jobs", params=params, headers=api.headers()).json()
        pages += 1
        seen += [job["id"] for job in page["data"]]
        assert all(job["name"] == "a" for job in page["data"])
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert seen == [ids[6], ids[3], ids[0]] and pages == 2


def test_list_filters_by_state_and_time(seeded: tuple[Api, list[str]], clock: FakeClock) -> None:
    api, ids = seeded
    for job_id in ids[:2]:
        api.http.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers())
    assert job_ids(api, state="CANCELLED", limit=1) == [ids[1]]
    assert set(job_ids(api, state=["CANCELLED", "QUEUED"])) == set(ids)
    start = clock.now - timedelta(minutes=9)
    window = {
        "created_after": (start + timedelta(minutes=2, seconds=30)).isoformat(),
        "created_before": (start + timedelta(minutes=5, seconds=30))
        .replace(tzinfo=None)
        .isoformat(),
    }
    assert job_ids(api, **window) == [ids[4], ids[3], ids[2]]
    assert job_ids(api, limit=3) == ids[::-1][:3]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"cursor": "garbage"}, "cursor"),
        ({"state": "RUNNING"}, "state"),
        ({"created_after": "yesterday"}, "created_after"),
    ],
)
def test_bad_list_parameters_are_422(api: Api, params: dict[str, Any], field: str) -> None:
    response = api.http.get("/v1/jobs", params=params, headers=api.headers())
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:2] == ["query", field]
    assert response.json()["message"]


# ------------------------------------------------------------------------ events


def drive_to_success(
    store: JobStore, job_id: str, after_each_write: Callable[[], None] = lambda: None
) -> None:
    """What a worker writes for a successful run. ``after_each_write`` runs after every
    write: a stream test waits there until the write has reached its client."""
    store.claim(job_id, "w1", 60)
    after_each_write()
    for state in (JobState.STAGE1, JobState.STAGE2):
        store.transition(job_id, state, worker_id="w1")
        after_each_write()
        stage = state.value.lower()
        store.add_event(job_id, f"{stage} started at step 0 of 2")
        after_each_write()
        for step in (1, 2):
            store.record_progress(job_id, "w1", stage, step, 2, {"loss": 1.0 / step})
            after_each_write()
    store.transition(job_id, JobState.REGISTERING, worker_id="w1")
    after_each_write()
    store.record_outputs(job_id, {"student": "jobs/x/student.pt"})
    after_each_write()
    store.transition(job_id, JobState.SUCCEEDED, worker_id="w1", message="done")
    after_each_write()


def test_events_history_and_after(api: Api) -> None:
    job, _ = api.store.create_job(api.project.id, make_spec())
    drive_to_success(api.store, job.id)
    events = api.http.get(f"/v1/jobs/{job.id}/events", headers=api.headers()).json()["data"]
    kinds = [(e["kind"], e["to_state"]) for e in events]
    assert kinds[0] == ("transition", "QUEUED") and kinds[-1] == ("transition", "SUCCEEDED")
    assert "stage2 started at step 0 of 2" in [e["message"] for e in events]
    later = api.http.get(
        f"/v1/jobs/{job.id}/events", params={"after": events[-2]["id"]}, headers=api.headers()
    ).json()["data"]
    assert later == events[-1:]
    detail = api.http.get(f"/v1/jobs/{job.id}", headers=api.headers()).json()
    assert detail["progress"] == {
        "stage1": {"step": 2, "total": 2},
        "stage2": {"step": 2, "total": 2},
    }
    assert detail["metrics"] == {"loss": 0.5} and detail["outputs"]["student"]
    assert [t["to_state"] for t in detail["transitions"]] == [
        "QUEUED",
        "STAGE1",
        "STAGE2",
        "REGISTERING",
        "SUCCEEDED",
    ]
    assert all(t["at"] for t in detail["transitions"])


def test_event_stream_follows_a_job_to_the_end(api: Api) -> None:
    """Every write reaches the client before the next one is made, so the events arrive
    while the job is still running: a server that sent the stream only once the job ended
    fails the first ``catch_up`` (the job is QUEUED then) rather than passing at the end."""
    job, _ = api.store.create_job(api.project.id, make_spec())
    with LiveEventStream(api, job.id) as stream:
        stream.catch_up()
        drive_to_success(api.store, job.id, after_each_write=stream.catch_up)
        received = stream.read_to_end()
    names = [name for name, _ in received]
    assert names[-1] == "end" and received[-1][1]["state"] == "SUCCEEDED"
    states = [data["to_state"] for name, data in received if name == "transition"]
    assert states == ["QUEUED", "STAGE1", "STAGE2", "REGISTERING", "SUCCEEDED"]
    steps = [
        data["progress"].get("stage2", {}).get("step")
        for name, data in received
        if name == "progress"
    ]
    assert 1 in steps or 2 in steps, "progress updates are streamed"
    ids = [data["id"] for name, data in received if name in ("transition", "info")]
    assert ids == sorted(ids) and len(ids) == len(set(ids))


def test_event_stream_resumes_after_last_event_id(api: Api) -> None:
    job, _ = api.store.create_job(api.project.id, make_spec())
    api.http.post(f"/v1/jobs/{job.id}/cancel", headers=api.headers())
    first_id = api.store.list_events(api.project.id, job.id)[0].id
    response = api.http.get(
        f"/v1/jobs/{job.id}/events/stream",
        headers={**api.headers(), "Last-Event-ID": str(first_id)},
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert f"id: {first_id}\n" not in response.text
    assert '"to_state": "CANCELLED"' in response.text and "event: end" in response.text


# ------------------------------------------------------------------------ probes and schema


def test_health_and_readiness_need_no_key(api: Api) -> None:
    assert api.http.get("/healthz").json() == {"status": "ok"}
    ready = api.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "schema": "ok", "broker": "ok", "mlflow": "ok"},
    }


def test_readiness_reports_an_outdated_schema(api: Api) -> None:
    downgrade_to(api.settings.database_url, "base")
    response = api.http.get("/readyz")
    assert response.status_code == 503
    assert "alembic upgrade head" in response.json()["checks"]["schema"]
    assert response.json()["checks"]["broker"] == "ok"


@pytest.mark.slow
def test_readiness_reports_an_unreachable_broker(
    service_settings: Settings, job_store: JobStore
) -> None:
    settings = service_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with open_api(settings, job_store) as api:
        response = api.http.get("/readyz")
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"
        assert response.json()["checks"]["broker"].startswith("unreachable")


def test_an_unmigrated_database_is_refused_at_startup(
    empty_database_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=empty_database_url, data_dir=tmp_path)
    expected = r"run `alembic upgrade head` \(or `maskd db upgrade`\)"
    with pytest.raises(SchemaOutdatedError, match=expected), TestClient(create_app(settings)):
        pass


def test_unknown_paths_say_where_the_api_is(api: Api) -> None:
    response = api.http.get("/jobs", headers=api.headers())
    assert response.status_code == 404 and "/v1" in response.json()["detail"]
    response = api.http.delete("/v1/jobs", headers=api.headers())
    assert response.status_code == 405 and "DELETE" in response.json()["detail"]


def test_client_raises_api_errors_with_the_servers_reason(api: Api) -> None:
    client = MaskdClient(api.http, api.key)
    job = client.submit_job(make_spec("via-client"), idempotency_key="c-1")
    assert client.get_job(job.id).name == "via-client"
    assert client.list_jobs(name="via-client").data[0].id == job.id
    assert client.cancel_job(job.id).state == "CANCELLED"
    assert client.wait(job.id, timeout=5).state == "CANCELLED"
    with pytest.raises(ApiError, match="already finished") as error:
        client.cancel_job(job.id)
    assert error.value.status_code == 409
