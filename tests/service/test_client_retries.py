"""``MaskdClient``'s retries and timeouts against a real HTTP server that misbehaves on purpose.

The server (``http.server`` on loopback, in a thread) answers each request from a script: a
503 with ``Retry-After``, a connection dropped without an answer, a stall past the client's
timeout, or a job. It records what each request carried, so the tests see what went over the
wire: how many tries, and which ``Idempotency-Key`` each had.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from service.client import (
    ApiError,
    Job,
    MaskdClient,
    RetryPolicy,
    ServerUnreachableError,
    Timeouts,
)

FAST_RETRIES = RetryPolicy(attempts=4, backoff=0.01, max_backoff=0.05)
JOB = {
    "id": "job-1",
    "name": "tiny",
    "state": "QUEUED",
    "created_at": "2030-01-01T00:00:00Z",
    "a_field_from_a_newer_server": {"kept": True},
}


@dataclass
class Reply:
    """One scripted answer: a status and body, or a dropped connection, or a stall first."""

    status: int = 200
    body: dict[str, Any] = field(default_factory=lambda: JOB)
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False
    stall_seconds: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


class ScriptedServer:
    """Answers the n-th request with ``script[n]`` (the last reply once the script runs out)."""

    def __init__(self, script: list[Reply]) -> None:
        self.script = script
        self.seen: list[Seen] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.answer(self)

            def do_POST(self) -> None:
                owner.answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads ``seen`` instead."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        handler.rfile.read(length)
        self.seen.append(
            Seen(handler.command, handler.path, dict(handler.headers.items()), time.monotonic())
        )
        reply = self.script[min(len(self.seen), len(self.script)) - 1]
        if reply.stall_seconds:
            time.sleep(reply.stall_seconds)
        if reply.drop:
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return
        payload = json.dumps(reply.body).encode()
        handler.send_response(reply.status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # After a stall the client has timed out and gone: that is the point.
            handler.wfile.write(payload)


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[ScriptedServer] = []

    def start(*script: Reply) -> ScriptedServer:
        server = ScriptedServer(list(script))
        threading.Thread(target=server.httpd.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


def unavailable(retry_after: str = "0") -> Reply:
    return Reply(503, {"detail": "busy"}, {"Retry-After": retry_after})


def test_a_submission_is_retried_with_one_idempotency_key_until_it_is_stored(serve: Any) -> None:
    server = serve(unavailable(), Reply(drop=True), Reply(502, {"detail": "proxy"}), Reply(201))
    with MaskdClient.connect(server.url, "mk_key", retry=FAST_RETRIES) as client:
        job = client.submit_job({"name": "tiny"})
    assert isinstance(job, Job) and job.id == "job-1" and job.state == "QUEUED"
    assert job.model_extra == {"a_field_from_a_newer_server": {"kept": True}}
    keys = {seen.headers.get("Idempotency-Key") for seen in server.seen}
    assert len(server.seen) == 4 and len(keys) == 1 and None not in keys, keys


def test_the_callers_idempotency_key_is_the_one_resent(serve: Any) -> None:
    server = serve(unavailable(), Reply(201))
    with MaskdClient.connect(server.url, "mk_key", retry=FAST_RETRIES) as client:
        client.submit_job({"name": "tiny"}, idempotency_key="mine-1")
    assert [seen.headers.get("Idempotency-Key") for seen in server.seen] == ["mine-1"] * 2


def test_a_post_without_an_idempotency_key_is_never_resent(serve: Any) -> None:
    server = serve(unavailable(), Reply(202))
    with (
        MaskdClient.connect(server.url, "mk_key", retry=FAST_RETRIES) as client,
        pytest.raises(ApiError, match="HTTP 503: busy"),
    ):
        client.cancel_job("job-1")
    assert len(server.seen) == 1

    dropped = serve(Reply(drop=True), Reply(202))
    with (
        MaskdClient.connect(dropped.url, "mk_key", retry=FAST_RETRIES) as client,
        pytest.raises(ServerUnreachableError),
    ):
        client.cancel_job("job-1")
    assert len(dropped.seen) == 1, "the server may have cancelled it: not sent again"


def test_retry_after_is_honoured_and_a_long_one_is_raised_at_once(serve: Any) -> None:
    server = serve(unavailable("1"), Reply(200))
    with MaskdClient.connect(server.url, "mk_key", retry=FAST_RETRIES) as client:
        assert client.get_job("job-1").id == "job-1"
    assert server.seen[1].at - server.seen[0].at >= 0.9

    quota = serve(Reply(429, {"detail": {"message": "quota reached"}}, {"Retry-After": "60"}))
    with (
        MaskdClient.connect(quota.url, "mk_key", retry=FAST_RETRIES) as client,
        pytest.raises(ApiError, match="HTTP 429: quota reached") as error,
    ):
        client.submit_job({"name": "tiny"})
    assert error.value.status_code == 429 and len(quota.seen) == 1


def test_retries_are_bounded_and_errors_that_retrying_cannot_fix_are_raised(serve: Any) -> None:
    server = serve(unavailable())
    with (
        MaskdClient.connect(server.url, "mk_key", retry=FAST_RETRIES) as client,
        pytest.raises(ApiError, match="HTTP 503"),
    ):
        client.get_job("job-1")
    assert len(server.seen) == FAST_RETRIES.attempts

    missing = serve(Reply(404, {"detail": "job job-1 not found in this project"}))
    with (
        MaskdClient.connect(missing.url, "mk_key", retry=FAST_RETRIES) as client,
        pytest.raises(ApiError, match="not found") as error,
    ):
        client.get_job("job-1")
    assert error.value.status_code == 404 and len(missing.seen) == 1


def test_a_stalled_answer_times_out_and_is_retried(serve: Any) -> None:
    server = serve(Reply(stall_seconds=1.0), Reply(200))
    timeouts = Timeouts(connect=1.0, read=0.2)
    with MaskdClient.connect(server.url, "mk_key", retry=FAST_RETRIES, timeouts=timeouts) as c:
        assert c.get_job("job-1").id == "job-1"
    assert len(server.seen) == 2


def test_a_server_that_is_down_is_one_error_after_the_retries() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{placeholder.getsockname()[1]}"  # bound, never listening
        client = MaskdClient.connect(url, "mk_key", retry=FAST_RETRIES)
        with client, pytest.raises(ServerUnreachableError, match=f"API at {url}"):
            client.get_job("job-1")
