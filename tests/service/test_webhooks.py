"""Signed webhooks against a real local receiver (an ``http.server`` thread) on SQLite and
PostgreSQL: every state change arrives signed, failures are retried with backoff and logged,
replays and tampered bodies fail verification, and projects never see each other's endpoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from service_testkit import Api, FakeClock, make_spec, open_api

from service.config import Settings
from service.lifecycle import JobState
from service.store import JobStore
from service.webhook_signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    ReplayGuard,
    WebhookSignatureError,
    signature_header,
    verify_signature,
)
from service.webhooks import (
    WebhookUrlRefused,
    check_webhook_url,
    deliver_due,
    retry_delay,
    start_webhook_sender_thread,
)

WORKER = "worker-1"


@dataclass
class Received:
    headers: httpx.Headers
    body: bytes
    answer: int


@dataclass
class Receiver:
    """A webhook receiver as a user would write one: it verifies each signature with the
    shipped helper, drops replays by delivery id, and answers ``fail_first`` requests 500."""

    secret: str = ""
    fail_first: int = 0
    requests: list[Received] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    guard: ReplayGuard = field(default_factory=ReplayGuard)
    url: str = ""

    def handle(self, headers: httpx.Headers, body: bytes) -> int:
        if len(self.requests) < self.fail_first:
            answer = 500
        else:
            try:
                sent_at = verify_signature(self.secret, headers[SIGNATURE_HEADER], body)
            except (WebhookSignatureError, KeyError):
                answer = 400
            else:
                if self.guard.accept(headers[DELIVERY_HEADER], sent_at):
                    self.accepted.append(json.loads(body))
                    answer = 200
                else:
                    answer = 409
        self.requests.append(Received(headers, body, answer))
        return answer


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = state.handle(httpx.Headers(dict(self.headers.items())), body)
            self.send_response(answer)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}/hooks/maskd"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def hook_settings(service_settings: Settings) -> Settings:
    """Loopback receivers allowed (the default refuses them), fast polling and retries."""
    return service_settings.model_copy(
        update={
            "webhook_allow_private_addresses": True,
            "webhook_poll_interval_seconds": 0.05,
            "webhook_timeout_seconds": 5.0,
            "webhook_max_attempts": 3,
            "webhook_retry_base_seconds": 10.0,
        }
    )


@pytest.fixture
def hook_api(hook_settings: Settings, job_store: JobStore) -> Iterator[Api]:
    with open_api(hook_settings, job_store) as opened:
        yield opened


def register(api: Api, receiver: Receiver, key: str | None = None, **body: Any) -> str:
    response = api.http.post(
        "/v1/webhooks", json={"url": receiver.url, **body}, headers=api.headers(key)
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["secret"].startswith("whsec_")
    receiver.secret = created["secret"]
    return str(created["id"])


def resend(receiver: Receiver, body: bytes, headers: httpx.Headers) -> httpx.Response:
    """Post ``body`` to the receiver with a captured delivery's maskd headers."""
    kept = {name: headers[name] for name in (SIGNATURE_HEADER, DELIVERY_HEADER, EVENT_HEADER)}
    return httpx.post(receiver.url, content=body, headers=kept)


def run_to_success(store: JobStore, job_id: str) -> None:
    assert store.claim(job_id, WORKER, lease_seconds=60) is not None
    for state in (JobState.STAGE1, JobState.STAGE2, JobState.REGISTERING, JobState.SUCCEEDED):
        assert store.transition(job_id, state, worker_id=WORKER)


def wait_for(condition: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_every_state_change_reaches_a_receiver_that_verifies_it(
    hook_api: Api, hook_settings: Settings, receiver: Receiver
) -> None:
    webhook_id = register(hook_api, receiver)
    stop = threading.Event()
    sender = start_webhook_sender_thread(hook_api.store, hook_settings, stop)
    try:
        job, _ = hook_api.store.create_job(
            hook_api.project.id, make_spec(labels={"team": "vision"})
        )
        run_to_success(hook_api.store, job.id)
        wait_for(lambda: len(receiver.accepted) == 5)
    finally:
        stop.set()
        sender.join(5)

    assert all(request.answer == 200 for request in receiver.requests)
    by_event = sorted(receiver.accepted, key=lambda body: body["data"]["event_id"])
    assert [(b["data"]["from_state"], b["data"]["to_state"]) for b in by_event] == [
        (None, "QUEUED"),
        ("QUEUED", "STAGE1"),
        ("STAGE1", "STAGE2"),
        ("STAGE2", "REGISTERING"),
        ("REGISTERING", "SUCCEEDED"),
    ]
    first = by_event[0]
    assert first["type"] == "job.state_changed"
    assert first["data"]["job_id"] == job.id
    assert first["data"]["labels"] == {"team": "vision"}
    request = receiver.requests[0]
    assert request.headers[EVENT_HEADER] == "job.state_changed"
    assert request.headers["Content-Type"] == "application/json"
    assert {r.headers[DELIVERY_HEADER] for r in receiver.requests} == {
        body["id"] for body in receiver.accepted
    }

    log = hook_api.http.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=hook_api.headers())
    assert log.status_code == 200
    entries = log.json()["data"]
    assert len(entries) == 5
    assert {(e["status"], e["attempts"], e["last_status_code"]) for e in entries} == {
        ("delivered", 1, 200)
    }
    assert all(e["delivered_at"] and e["next_attempt_at"] is None for e in entries)
    assert {e["to_state"] for e in entries} == {s["data"]["to_state"] for s in by_event}


def test_a_replayed_delivery_and_a_tampered_body_are_refused(
    hook_api: Api, hook_settings: Settings, receiver: Receiver
) -> None:
    register(hook_api, receiver, states=["QUEUED"])
    hook_api.store.create_job(hook_api.project.id, make_spec())
    assert len(deliver_due(hook_api.store, hook_settings).delivered) == 1
    [original] = receiver.requests
    assert original.answer == 200

    # The very same request again (a replay inside the tolerance): the guard drops it.
    replayed = resend(receiver, original.body, original.headers)
    assert replayed.status_code == 409
    # The same delivery later: its signed timestamp is too old.
    sent_at = verify_signature(receiver.secret, original.headers[SIGNATURE_HEADER], original.body)
    with pytest.raises(WebhookSignatureError, match="outside the 300 s tolerance"):
        verify_signature(
            receiver.secret, original.headers[SIGNATURE_HEADER], original.body, now=sent_at + 301
        )
    # A re-signed timestamp without the secret, or a changed body, fails the HMAC.
    forged = original.headers[SIGNATURE_HEADER].replace(f"t={sent_at}", f"t={sent_at + 1}")
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_signature(receiver.secret, forged, original.body, now=sent_at)
    tampered = original.body.replace(b'"QUEUED"', b'"SUCCEEDED"')
    assert tampered != original.body
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_signature(receiver.secret, original.headers[SIGNATURE_HEADER], tampered)
    answer = resend(receiver, tampered, original.headers)
    assert answer.status_code == 400
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_signature("whsec_another", original.headers[SIGNATURE_HEADER], original.body)
    assert len(receiver.accepted) == 1


def test_signature_header_format_and_the_replay_guard() -> None:
    body = b'{"a":1}'
    header = signature_header("whsec_s", body, 1_900_000_000)
    assert header.startswith("t=1900000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify_signature("whsec_s", header, body, now=1_900_000_100) == 1_900_000_000
    rotated = f"{header},v1={'0' * 64}"
    assert verify_signature("whsec_s", rotated, body, now=1_900_000_000) == 1_900_000_000
    for malformed in ("", "v1=abc", "t=12", "t=x,v1=abc"):
        with pytest.raises(WebhookSignatureError, match="malformed"):
            verify_signature("whsec_s", malformed, body, now=1_900_000_000)
    with pytest.raises(WebhookSignatureError, match="tolerance"):
        verify_signature("whsec_s", header, body, now=1_899_999_000)  # from the future

    guard = ReplayGuard(tolerance_s=300)
    assert guard.accept("d1", 1_900_000_000, now=1_900_000_000)
    assert not guard.accept("d1", 1_900_000_000, now=1_900_000_010)
    assert guard.accept("d2", 1_900_000_000, now=1_900_000_010)
    assert not guard.accept("d3", 1_900_000_000, now=1_900_000_400)  # too old to accept
    guard.forget("d2")
    assert guard.accept("d2", 1_900_000_000, now=1_900_000_020)


def test_a_failing_receiver_gets_retries_with_backoff_and_the_log_shows_them(
    hook_settings: Settings, clocked_store: JobStore, clock: FakeClock, receiver: Receiver
) -> None:
    store = clocked_store
    with open_api(hook_settings, store) as api:
        webhook_id = register(api, receiver, states=["QUEUED"])
        receiver.fail_first = 2
        job, _ = store.create_job(api.project.id, make_spec())

        def entry() -> dict[str, Any]:
            page = api.http.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=api.headers())
            [only] = page.json()["data"]
            return dict(only)

        assert deliver_due(store, hook_settings).retrying
        first = entry()
        assert (first["status"], first["attempts"], first["last_status_code"]) == (
            "pending",
            1,
            500,
        )
        assert first["last_error"] == "HTTP 500"
        assert first["job_id"] == job.id
        assert first["next_attempt_at"] == (
            clock.now + retry_delay(1, hook_settings)
        ).isoformat().replace("+00:00", "Z")

        clock.advance(9)
        assert deliver_due(store, hook_settings).retrying == []  # not due yet: no request
        assert len(receiver.requests) == 1
        clock.advance(1)
        assert deliver_due(store, hook_settings).retrying  # second 500; next wait doubles
        assert entry()["attempts"] == 2
        clock.advance(19)
        deliver_due(store, hook_settings)
        assert len(receiver.requests) == 2
        clock.advance(1)
        assert deliver_due(store, hook_settings).delivered
        done = entry()
        assert (done["status"], done["attempts"], done["last_status_code"]) == (
            "delivered",
            3,
            200,
        )
        assert done["last_error"] is None and done["delivered_at"] is not None
        assert [request.answer for request in receiver.requests] == [500, 500, 200]
        assert len({r.headers[DELIVERY_HEADER] for r in receiver.requests}) == 1

        # A receiver that never answers 2xx: the delivery fails after webhook_max_attempts.
        receiver.fail_first = 100
        store.create_job(api.project.id, make_spec("second"))
        for _ in range(hook_settings.webhook_max_attempts):
            deliver_due(store, hook_settings)
            clock.advance(3600)
        assert deliver_due(store, hook_settings).failed == []
        newest = api.http.get(
            f"/v1/webhooks/{webhook_id}/deliveries?limit=1", headers=api.headers()
        )
        page = newest.json()
        [failed] = page["data"]
        assert (failed["status"], failed["attempts"], failed["next_attempt_at"]) == (
            "failed",
            3,
            None,
        )
        older = api.http.get(
            f"/v1/webhooks/{webhook_id}/deliveries",
            params={"cursor": page["next_cursor"]},
            headers=api.headers(),
        )
        assert [e["status"] for e in older.json()["data"]] == ["delivered"]
        assert len(receiver.requests) == 3 + hook_settings.webhook_max_attempts


def test_projects_see_only_their_own_webhooks_and_jobs(
    hook_api: Api, hook_settings: Settings, receiver: Receiver
) -> None:
    webhook_id = register(hook_api, receiver)
    other = hook_api.headers(hook_api.other_key)
    assert hook_api.http.get("/v1/webhooks", headers=other).json() == {"data": []}
    for response in (
        hook_api.http.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=other),
        hook_api.http.delete(f"/v1/webhooks/{webhook_id}", headers=other),
    ):
        assert response.status_code == 404
        assert "not found in this project" in response.json()["detail"]
    # Another project's job changes state: nothing is delivered to this project's endpoint.
    globex = hook_api.store.create_project("globex")
    hook_api.store.create_job(globex.id, make_spec())
    assert deliver_due(hook_api.store, hook_settings).delivered == []
    assert receiver.requests == []

    [listed] = hook_api.http.get("/v1/webhooks", headers=hook_api.headers()).json()["data"]
    assert listed == {
        "id": webhook_id,
        "url": receiver.url,
        "states": None,
        "created_at": listed["created_at"],
    }
    hook_api.store.create_job(hook_api.project.id, make_spec())
    deleted = hook_api.http.delete(f"/v1/webhooks/{webhook_id}", headers=hook_api.headers())
    assert deleted.status_code == 204
    assert deliver_due(hook_api.store, hook_settings).delivered == [], "pending ones go too"
    assert hook_api.http.get("/v1/webhooks", headers=hook_api.headers()).json() == {"data": []}
    assert hook_api.http.get("/v1/webhooks").status_code == 401


def test_state_filter_and_refused_transitions_write_no_delivery(
    hook_api: Api, hook_settings: Settings, receiver: Receiver
) -> None:
    register(hook_api, receiver, states=["SUCCEEDED", "FAILED"])
    job, _ = hook_api.store.create_job(hook_api.project.id, make_spec())
    assert not hook_api.store.transition(job.id, JobState.SUCCEEDED, worker_id=None)
    run_to_success(hook_api.store, job.id)
    deliver_due(hook_api.store, hook_settings)
    assert [body["data"]["to_state"] for body in receiver.accepted] == ["SUCCEEDED"]


def test_registration_refuses_unsafe_urls_with_the_reason(api: Api) -> None:
    """The default settings refuse loopback and private receivers (SSRF); every setting
    refuses link-local ones (cloud metadata), credentials and other schemes."""

    def refusal(url: str) -> str:
        response = api.http.post("/v1/webhooks", json={"url": url}, headers=api.headers())
        assert response.status_code == 422, response.text
        [problem] = response.json()["detail"]
        assert problem["loc"] == ["body", "url"]
        return str(problem["msg"])

    assert "MASKD_WEBHOOK_ALLOW_PRIVATE_ADDRESSES" in refusal("http://127.0.0.1:8080/hook")
    assert "non-public" in refusal("http://10.1.2.3/hook")
    assert "link-local" in refusal("http://169.254.169.254/latest/meta-data")
    assert "credentials" in refusal("https://user:pw@example.com/hook")
    assert "http:// or https://" in refusal("ftp://example.com/hook")
    assert "no host" in refusal("http:///hook")
    assert "without spaces or control characters" in refusal("http://a.example/x\x00y")
    assert "punycode" in refusal("https://bücher.example/hook")
    assert "cannot resolve host 'nowhere.invalid'" in refusal("https://nowhere.invalid/hook")
    bad_state = api.http.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1/hook", "states": ["DONE"]},
        headers=api.headers(),
    )
    assert bad_state.status_code == 422

    def public(host: str, port: int) -> list[str]:
        return ["93.184.215.14"]

    assert check_webhook_url("https://hooks.example.com/x", False, public)
    for address in ("169.254.169.254", "fe80::1", "::ffff:169.254.169.254", "0.0.0.0"):
        with pytest.raises(WebhookUrlRefused):
            check_webhook_url(
                f"http://[{address}]/" if ":" in address else f"http://{address}/", True
            )
    assert check_webhook_url("http://127.0.0.1/x", True)


def test_the_sender_checks_the_address_again_before_each_attempt(
    hook_api: Api, hook_settings: Settings, receiver: Receiver
) -> None:
    """A name that resolved to a public address at registration may point at the metadata
    service later: the attempt is not sent, and the log says why."""
    webhook_id = register(hook_api, receiver, states=["QUEUED"])
    hook_api.store.create_job(hook_api.project.id, make_spec())

    def metadata(host: str, port: int) -> list[str]:
        return ["169.254.169.254"]

    assert deliver_due(hook_api.store, hook_settings, resolve=metadata).retrying
    assert receiver.requests == []
    page = hook_api.http.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=hook_api.headers())
    [entry] = page.json()["data"]
    assert entry["last_error"].startswith("not sent: host '127.0.0.1' is not allowed")
    assert "link-local" in entry["last_error"]


def test_a_project_may_register_only_so_many_webhooks(
    hook_settings: Settings, job_store: JobStore, receiver: Receiver
) -> None:
    with open_api(
        hook_settings.model_copy(update={"max_webhooks_per_project": 1}), job_store
    ) as api:
        register(api, receiver)
        response = api.http.post("/v1/webhooks", json={"url": receiver.url}, headers=api.headers())
        assert response.status_code == 409
        assert "MASKD_MAX_WEBHOOKS_PER_PROJECT" in response.json()["detail"]


def test_the_verify_helper_needs_only_the_standard_library() -> None:
    """Receivers use it from the bare client install: no FastAPI, database or torch."""
    code = (
        "import sys, service.webhook_signing; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'sqlalchemy', 'pydantic', 'pydantic_settings', 'torch', 'httpx'}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
