"""A burst of submissions is let in a few at a time (``service.api.submission_gate``): the rest
wait unread, a bounded number of them, and reads pass by them all."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi import FastAPI
from service_testkit import Api, open_api, spec_body

from service import validation_pool
from service.api.submission_gate import SubmissionGate
from service.validation_pool import SpecProblem, Validated


def gate_of(app: FastAPI) -> SubmissionGate:
    """The gate in the app's middleware stack (built when the app first served)."""
    layer = app.middleware_stack
    while not isinstance(layer, SubmissionGate):
        layer = layer.app  # type: ignore[union-attr]
    return layer


def test_submissions_past_the_limit_wait_their_turn_and_past_the_queue_get_503(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    validating, release = threading.Semaphore(0), threading.Event()
    real_validate = validation_pool._validate

    def held_validate(*args: object) -> Validated | SpecProblem:
        validating.release()
        release.wait(timeout=60)
        return real_validate(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(validation_pool, "_validate", held_validate)
    settings = api.settings.model_copy(
        update={
            "validation_processes": 0,
            "submissions_in_flight": 1,
            "validation_queue_limit": 1,
        }
    )
    with open_api(settings, api.store) as busy:
        statuses: dict[str, int] = {}

        def submit(name: str) -> threading.Thread:
            def post() -> None:
                answer = busy.http.post("/v1/jobs", json=spec_body(name), headers=busy.headers())
                statuses[name] = answer.status_code

            sender = threading.Thread(target=post)
            sender.start()
            return sender

        first = submit("first")
        assert validating.acquire(timeout=60), "the first submission is being validated"
        second = submit("second")
        gate = gate_of(busy.http.app)  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while gate.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gate.waiting == 1, "the second waits its turn"
        assert not validating.acquire(timeout=0.2), "and is not validated meanwhile"

        refused = busy.http.post("/v1/jobs", json=spec_body("third"), headers=busy.headers())
        read = busy.http.get("/v1/jobs", headers=busy.headers())
        release.set()
        first.join(timeout=60)
        second.join(timeout=60)
        listed = busy.http.get("/v1/jobs", headers=busy.headers()).json()["data"]

    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == str(validation_pool.BUSY_RETRY_AFTER_SECONDS)
    assert "MASKD_VALIDATION_QUEUE_LIMIT" in refused.json()["detail"]
    assert read.status_code == 200, "reads are never held at the gate"
    assert statuses == {"first": 201, "second": 201}
    assert sorted(job["name"] for job in listed) == ["first", "second"]
