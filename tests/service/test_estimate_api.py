"""``POST /v1/jobs/estimate`` and ``POST /v1/jobs?estimate=true`` over the real databases and
the embedded broker: validated like a submission, nothing stored or queued for an estimate, the
estimate recorded on a job that asks for it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fastapi import FastAPI
from service_testkit import Api, open_api, spec_body

from service import validation_pool
from service.api.submission_gate import SubmissionGate
from service.client import MaskdClient


def stored_jobs(api: Api) -> int:
    response = api.http.get("/v1/jobs", headers=api.headers())
    assert response.status_code == 200, response.text
    return len(response.json()["data"])


@pytest.mark.slow  # measures a few real training steps
def test_an_estimate_answers_the_cost_and_stores_and_queues_nothing(api: Api) -> None:
    response = api.http.post("/v1/jobs/estimate", json=spec_body(), headers=api.headers())

    assert response.status_code == 200, response.text
    estimate = response.json()
    assert estimate["format"] == "maskd-estimate/1"
    assert [stage["stage"] for stage in estimate["stages"]] == ["stage1", "stage2"]
    assert [stage["iterations"] for stage in estimate["stages"]] == [4, 6]
    for stage in estimate["stages"]:
        assert stage["seconds_per_step"] > 0 and stage["flops_per_step"] > 0
        assert stage["peak_memory_bytes"] > 0
    assert estimate["teacher"]["arch"] == "seg_tiny_teacher"
    assert estimate["student"]["parameters"] > 0
    assert estimate["measured_on"]["device"] in ("cpu", "cuda")
    assert estimate["total_seconds"] > 0
    assert stored_jobs(api) == 0 and api.queued_messages() == []


def test_an_estimate_of_a_bad_spec_is_the_submission_s_422(api: Api) -> None:
    body = spec_body(teacher={"arch": "seg_tiny_teacher", "layers": ["backbon"]})
    response = api.http.post("/v1/jobs/estimate", json=body, headers=api.headers())

    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "teacher", "layers[0]"]
    assert stored_jobs(api) == 0 and api.queued_messages() == []


def test_an_estimate_needs_a_key(api: Api) -> None:
    response = api.http.post("/v1/jobs/estimate", json=spec_body())
    assert response.status_code == 401


@pytest.mark.slow  # measures a few real training steps
def test_a_submission_that_asks_for_an_estimate_records_it_on_the_job(api: Api) -> None:
    client = MaskdClient(api.http, api.key)

    job = client.submit_job(spec_body("measured"), estimate=True)
    plain = client.submit_job(spec_body("unmeasured"))

    estimate = job.outputs["estimate"]
    assert [stage["stage"] for stage in estimate["stages"]] == ["stage1", "stage2"]
    # The pairing is reported as on any submission, from the estimate's own validation.
    assert job.outputs["pairing"] == plain.outputs["pairing"] == estimate["pairing"]
    assert "actual" not in estimate or estimate["actual"] is None
    assert client.get_job(job.id).outputs["estimate"] == estimate
    assert plain.outputs.get("estimate") is None
    assert len(api.queued_messages()) == 2


@pytest.mark.slow  # measures a few real training steps
def test_the_client_reads_an_estimate_typed(api: Api) -> None:
    estimate = MaskdClient(api.http, api.key).estimate_job(spec_body())
    assert estimate.stages[1].stage == "stage2"
    assert estimate.total_seconds == sum(stage.seconds for stage in estimate.stages)


@pytest.mark.slow  # measures a few real training steps
def test_estimates_wait_at_the_submission_gate_and_past_its_queue_get_503(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    measuring, release = threading.Semaphore(0), threading.Event()
    real_estimate = validation_pool._estimate

    def held_estimate(*args: Any) -> Any:
        measuring.release()
        release.wait(timeout=60)
        return real_estimate(*args)

    monkeypatch.setattr(validation_pool, "_estimate", held_estimate)
    settings = api.settings.model_copy(
        update={"validation_processes": 0, "submissions_in_flight": 1, "validation_queue_limit": 1}
    )
    with open_api(settings, api.store) as busy:
        statuses: list[int] = []

        def estimate() -> None:
            answer = busy.http.post("/v1/jobs/estimate", json=spec_body(), headers=busy.headers())
            statuses.append(answer.status_code)

        senders = [threading.Thread(target=estimate) for _ in range(2)]
        senders[0].start()
        assert measuring.acquire(timeout=60), "the first estimate is being measured"
        senders[1].start()
        gate = gate_of(busy.http.app)  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while gate.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.waiting == 1, "the second estimate waits its turn at the gate"
        refused = busy.http.post("/v1/jobs/estimate", json=spec_body(), headers=busy.headers())
        release.set()
        for sender in senders:
            sender.join(timeout=60)

    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert statuses == [200, 200]
    assert stored_jobs(api) == 0 and api.queued_messages() == []


def gate_of(app: FastAPI) -> SubmissionGate:
    layer = app.middleware_stack
    while not isinstance(layer, SubmissionGate):
        layer = layer.app  # type: ignore[union-attr]
    return layer
