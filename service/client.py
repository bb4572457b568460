"""The Python client of the maskd API, used by the CLI, the demo and the tests.

It wraps any ``httpx.Client`` (a plain one for a real server, Starlette's ``TestClient`` in
tests) and returns typed results (``Job``, ``JobPage``, ``Event``, ``ModelVersion``, ...). Those
are the client's own models, not the server's: the bare ``pip install maskd`` has no FastAPI or
SQLAlchemy to import them from, and they accept fields they do not know, so an older client
keeps working against a newer server.

Requests that fail on the way (the server restarting, a proxy's 502/503/504, a 429) are retried
with exponential backoff and jitter, honouring ``Retry-After``, a bounded number of times
(``RetryPolicy``). A POST is retried only when it carries an ``Idempotency-Key``, which the
retries reuse, so a submission whose answer was lost is never stored twice; ``submit_job``
makes one up when the caller gives none. An error answer becomes ``ApiError`` with the
server's explanation; a server that cannot be reached at all, ``ServerUnreachableError``.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from maskd_core.spec import JobSpec

TERMINAL_STATES = frozenset({"SUCCEEDED", "CANCELLED", "FAILED"})
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
KEEPALIVE_GRACE_SECONDS = 60.0
"""How long the event stream may stay silent before the client takes the connection for dead
and reconnects: the server sends a keepalive every 15 s."""


class MaskdClientError(Exception):
    """Anything the client could not do; the subclasses say whether the server answered."""


class ApiError(MaskdClientError):
    """An error response; ``detail`` is the server's body (what is wrong and how to fix it)."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {_describe(detail)}")
        self.status_code = status_code
        self.detail = detail


class ServerUnreachableError(MaskdClientError):
    """No answer from the server (refused, reset, timed out) after every retry."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the maskd API at {url}: {reason}")
        self.url = url


# ------------------------------------------------------------------------ typed results


class ApiModel(BaseModel):
    """A response body; unknown fields are kept (``model_extra``), never refused."""

    model_config = ConfigDict(extra="allow")


class StageProgress(ApiModel):
    step: int
    total: int


class Transition(ApiModel):
    from_state: str | None = None
    to_state: str
    at: datetime
    message: str | None = None


class Job(ApiModel):
    """A job as ``GET /v1/jobs/{id}`` shows it. States are plain strings, so a state added by a
    newer server is shown rather than refused."""

    id: str
    name: str
    state: str
    stage: str | None = None
    progress: dict[str, StageProgress] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    failure_kind: str | None = None
    message: str | None = None
    attempt: int = 0
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    transitions: list[Transition] = Field(default_factory=list)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobPage(ApiModel):
    data: list[Job]
    next_cursor: str | None = None


class ModelCost(ApiModel):
    arch: str
    parameters: int
    forward_flops_per_image: int


class MeasuredOn(ApiModel):
    """Where the estimate's steps ran; ``representative`` false: its seconds are not the
    worker's (measured on the API host's CPU for a GPU job)."""

    device: str
    device_name: str
    target_device: str
    representative: bool
    note: str


class StageEstimate(ApiModel):
    stage: str
    iterations: int
    batch_per_process: int
    seconds_per_step: float
    flops_per_step: int
    peak_memory_bytes: int
    evaluation_passes: int
    evaluation_seconds: float
    seconds: float


class JobEstimate(ApiModel):
    """``POST /v1/jobs/estimate``'s answer (and a job's ``outputs["estimate"]``)."""

    format: str
    measured_on: MeasuredOn
    measured_steps: int
    world_size: int
    memory_method: str
    teacher: ModelCost
    student: ModelCost | None = None
    stages: list[StageEstimate]
    total_seconds: float


class Event(ApiModel):
    """A history line: a transition (``to_state`` set) or a note (``kind`` info or error)."""

    id: int
    kind: str
    from_state: str | None = None
    to_state: str | None = None
    message: str | None = None
    created_at: datetime


class Progress(ApiModel):
    """The stream's ``progress`` message: the job's state, stage, steps and latest metrics."""

    state: str
    stage: str | None = None
    progress: dict[str, StageProgress] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)


class StreamEnd(ApiModel):
    """The stream's last message: the job is terminal."""

    state: str
    failure_kind: str | None = None


StreamItem = Event | Progress | StreamEnd


class RegisteredModel(ApiModel):
    name: str
    description: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    """Alias → version number."""
    created_at: datetime | None = None
    updated_at: datetime | None = None


class ModelVersion(ApiModel):
    name: str
    version: str
    aliases: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    status: str | None = None
    source: str | None = None
    run_id: str | None = None
    experiment_id: str | None = None
    run_link: str | None = None
    """The run in the MLflow UI when the server tracks to an MLflow server."""
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: datetime | None = None


class _ModelList(ApiModel):
    data: list[RegisteredModel]


class _VersionList(ApiModel):
    data: list[ModelVersion]


class _EventList(ApiModel):
    data: list[Event]


# ------------------------------------------------------------------------ retries


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a request that failed on the way.

    ``attempts`` counts the first try. The n-th retry waits a random time up to
    ``backoff * 2**n`` seconds (at most ``max_backoff``): "full jitter", so many clients cut off
    by one restart do not all come back at the same instant. A ``Retry-After`` answer is
    honoured instead, unless it asks for more than ``max_retry_after`` seconds (a quota that
    frees up in a minute): then the error is raised at once rather than blocking the caller.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 30.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return random.uniform(0.0, min(self.max_backoff, self.backoff * 2**retry))


NO_RETRIES = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class Timeouts:
    """Seconds per request: to connect, and to wait for the answer."""

    connect: float = 10.0
    read: float = 60.0

    def httpx(self) -> httpx.Timeout:
        return httpx.Timeout(self.read, connect=self.connect)


class MaskdClient:
    """Calls the API with a project's key.

    ``MaskdClient.connect(url, key)`` opens its own connection pool (close it, or use it as a
    context manager); ``MaskdClient(http, key)`` reuses an existing ``httpx.Client``.
    """

    def __init__(
        self,
        http: httpx.Client,
        api_key: str | None,
        *,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self._http = http
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()

    @classmethod
    def connect(
        cls,
        base_url: str,
        api_key: str | None,
        *,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
    ) -> MaskdClient:
        timeouts = timeouts or Timeouts()
        http = httpx.Client(base_url=base_url, timeout=timeouts.httpx())
        return cls(http, api_key, retry=retry, timeouts=timeouts)

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MaskdClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------------- jobs

    def submit_job(
        self,
        spec: JobSpec | dict[str, Any],
        idempotency_key: str | None = None,
        *,
        estimate: bool = False,
    ) -> Job:
        """Submit a job; with the key of an earlier submission, that job comes back.

        Without a key one is made up, so the retries of this call cannot store the job twice.
        With ``estimate`` the server measures the job first and records the estimate as
        ``outputs["estimate"]``, which the worker compares with the actual times.
        """
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
        headers = {"Idempotency-Key": idempotency_key or f"maskd-client-{uuid.uuid4()}"}
        params = {"estimate": "true"} if estimate else {}
        answer = self._request("POST", "/v1/jobs", json=body, headers=headers, params=params)
        return Job.model_validate(answer)

    def estimate_job(self, spec: JobSpec | dict[str, Any]) -> JobEstimate:
        """What the job would cost, measured on a few real steps; nothing is stored or queued.

        Safe to send again (it changes nothing), so a busy server's 503 is retried as a GET's.
        """
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
        answer = self._request("POST", "/v1/jobs/estimate", json=body, resend_safe=True)
        return JobEstimate.model_validate(answer)

    def get_job(self, job_id: str) -> Job:
        return Job.model_validate(self._request("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(
        self,
        *,
        states: list[str] | None = None,
        name: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        labels: Mapping[str, str] | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> JobPage:
        """One page, newest first; pass its ``next_cursor`` as ``cursor`` for the next.

        ``labels``: only jobs that carry every one of these labels.
        """
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = states
        if labels:
            params["label"] = [f"{key}={value}" for key, value in labels.items()]
        if name is not None:
            params["name"] = name
        if created_after is not None:
            params["created_after"] = created_after.isoformat()
        if created_before is not None:
            params["created_before"] = created_before.isoformat()
        if cursor is not None:
            params["cursor"] = cursor
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=params))

    def iter_jobs(
        self,
        *,
        states: list[str] | None = None,
        name: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
    ) -> Iterator[Job]:
        """Every matching job, newest first, fetching pages as the caller reads on."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(
                states=states,
                name=name,
                created_after=created_after,
                created_before=created_before,
                labels=labels,
                limit=page_size,
                cursor=cursor,
            )
            yield from page.data
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel_job(self, job_id: str) -> Job:
        return Job.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def list_events(self, job_id: str, after: int = 0) -> list[Event]:
        page = self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
        return _EventList.model_validate(page).data

    def follow(self, job_id: str, after: int = 0) -> Iterator[StreamItem]:
        """The job's events and progress as they happen, until ``StreamEnd``.

        A dropped connection (or one silent past ``KEEPALIVE_GRACE_SECONDS``) is reopened with
        ``Last-Event-ID`` set to the last event seen, under the retry policy (whose count
        starts again once a connection delivers something), so no event is lost or repeated.
        """
        last_event_id = after
        failures = 0
        while True:
            try:
                for event, data, event_id in self._sse_messages(job_id, last_event_id):
                    failures = 0
                    if event == "end":
                        yield StreamEnd.model_validate(data)
                        return
                    if event == "progress":
                        yield Progress.model_validate(data)
                    else:
                        yield Event.model_validate(data)
                    last_event_id = event_id or last_event_id
                reason = "the event stream keeps closing before the job ends"
            except httpx.TransportError as error:
                reason = _transport_reason(error)
            except ApiError as error:
                # A proxy's 502/503/504 while the API restarts: reconnect as after a drop.
                if error.status_code not in RETRYABLE_STATUSES:
                    raise
                reason = str(error)
            failures += 1
            if failures >= self.retry.attempts:
                raise ServerUnreachableError(self.base_url, reason)
            time.sleep(self.retry.delay(failures - 1, None))

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """The raw server-sent events of one connection as ``(event, data)``, no reconnects:
        what the server sends, for tests of the server; ``follow`` is what callers want."""
        for event, data, _ in self._sse_messages(job_id, after):
            yield event, data

    def _sse_messages(
        self, job_id: str, last_event_id: int
    ) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        """``(event, data, id)`` per message of one connection opened after ``last_event_id``."""
        headers = {**self._headers, "Last-Event-ID": str(last_event_id)}
        timeout = httpx.Timeout(KEEPALIVE_GRACE_SECONDS, connect=self.timeouts.connect)
        with self._http.stream(
            "GET", f"/v1/jobs/{job_id}/events/stream", headers=headers, timeout=timeout
        ) as response:
            if response.is_error:
                response.read()
                raise ApiError(response.status_code, _body(response))
            event, data, event_id = "message", "", None
            for line in response.iter_lines():
                if line.startswith("id:"):
                    event_id = int(line.removeprefix("id:").strip())
                elif line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data += line.removeprefix("data:").strip()
                elif not line and data:
                    yield event, json.loads(data), event_id
                    event, data, event_id = "message", "", None

    def wait(self, job_id: str, timeout: float, poll_seconds: float = 1.0) -> Job:
        """Poll until the job is terminal; raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.is_terminal:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            time.sleep(poll_seconds)

    # -------------------------------------------------------------------- models

    def list_models(self) -> list[RegisteredModel]:
        return _ModelList.model_validate(self._request("GET", "/v1/models")).data

    def list_versions(self, name: str) -> list[ModelVersion]:
        """The model's versions, newest first."""
        return _VersionList.model_validate(self._request("GET", f"/v1/models/{name}/versions")).data

    def get_version(self, name: str, version: str) -> ModelVersion:
        """One version by number ("3") or alias ("@champion"), with its metrics and run link."""
        return ModelVersion.model_validate(
            self._request("GET", f"/v1/models/{name}/versions/{version}")
        )

    def set_alias(self, name: str, alias: str, version: str) -> ModelVersion:
        """Point ``alias`` at ``version`` (a PUT: retried like a read)."""
        body = {"version": version}
        return ModelVersion.model_validate(
            self._request("PUT", f"/v1/models/{name}/aliases/{alias}", json=body)
        )

    def download_weights(self, name: str, version: str, destination: Path) -> Path:
        """Write the version's state dict to ``destination`` (a file path), completely or not
        at all: it is streamed to a temporary name first. Load it with
        ``torch.load(path, weights_only=True)``."""
        return self._download(f"/v1/models/{name}/versions/{version}/weights", destination)

    def download_export(
        self, name: str, version: str, export_format: str, destination: Path
    ) -> Path:
        """Write a student version's export (``onnx``: run it with onnxruntime;
        ``torch_export``: a ``.pt2`` for ``torch.export.load``) to ``destination``, as
        ``download_weights`` does; a version whose export was refused answers 404 (its
        ``get_export_report`` says why)."""
        path = f"/v1/models/{name}/versions/{version}/exports/{export_format}"
        return self._download(path, destination)

    def get_export_report(self, name: str, version: str) -> dict[str, Any]:
        """A student version's export report: each format's status, what the exported outputs
        contain, their parity with the PyTorch student, the tolerances and the latencies."""
        return self._request("GET", f"/v1/models/{name}/versions/{version}/exports")

    def _download(self, path: str, destination: Path) -> Path:
        """The file at ``path`` streamed to ``destination`` through a temporary name."""
        partial = destination.with_name(f".{destination.name}.partial")
        for attempt in range(self.retry.attempts):
            last = attempt + 1 >= self.retry.attempts
            try:
                with self._http.stream("GET", path, headers=self._headers) as response:
                    if response.is_error:
                        response.read()
                        wait = None if last else self._retry_wait(attempt, "GET", {}, response)
                        if wait is None:
                            raise ApiError(response.status_code, _body(response))
                        time.sleep(wait)
                        continue
                    with partial.open("wb") as out:
                        for chunk in response.iter_bytes():
                            out.write(chunk)
            except httpx.TransportError as error:
                partial.unlink(missing_ok=True)
                if last:
                    raise ServerUnreachableError(self.base_url, _transport_reason(error)) from error
                time.sleep(self.retry.delay(attempt, None))
                continue
            partial.replace(destination)
            return destination
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -------------------------------------------------------------------- health

    def healthz(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def readyz(self) -> dict[str, Any]:
        """The readiness report; raises ``ApiError`` (503) with it when not ready."""
        return self._request("GET", "/readyz", retry=NO_RETRIES)

    # -------------------------------------------------------------------- transport

    def _request(
        self,
        method: str,
        path: str,
        *,
        retry: RetryPolicy | None = None,
        resend_safe: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """One call under the retry policy; the body of its successful answer.

        ``resend_safe``: a POST that changes nothing (an estimate), retried as a GET is."""
        policy = retry or self.retry
        headers = {**self._headers, **kwargs.pop("headers", {})}
        retried_as = "GET" if resend_safe else method
        for attempt in range(policy.attempts):
            last = attempt + 1 >= policy.attempts
            try:
                response = self._http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as error:
                if last or not _may_resend(retried_as, headers, error):
                    raise ServerUnreachableError(self.base_url, _transport_reason(error)) from error
                time.sleep(policy.delay(attempt, None))
                continue
            if not response.is_error:
                body: dict[str, Any] = response.json()
                return body
            wait = (
                None if last else self._retry_wait(attempt, retried_as, headers, response, policy)
            )
            if wait is None:
                raise ApiError(response.status_code, _body(response))
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _retry_wait(
        self,
        attempt: int,
        method: str,
        headers: dict[str, str],
        response: httpx.Response,
        policy: RetryPolicy | None = None,
    ) -> float | None:
        """Seconds to wait before retrying this error answer, or None to raise it."""
        policy = policy or self.retry
        if response.status_code not in RETRYABLE_STATUSES or not _idempotent(method, headers):
            return None
        retry_after = _retry_after_seconds(response)
        if retry_after is not None and retry_after > policy.max_retry_after:
            return None
        return policy.delay(attempt, retry_after)


def _idempotent(method: str, headers: dict[str, str]) -> bool:
    """Whether sending the request twice does what sending it once does."""
    return method.upper() != "POST" or "Idempotency-Key" in headers


def _may_resend(method: str, headers: dict[str, str], error: httpx.TransportError) -> bool:
    """A request that never left (no connection) may always be sent again; one the server may
    have acted on only when it is idempotent."""
    unsent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
    return unsent or _idempotent(method, headers)


def _retry_after_seconds(response: httpx.Response) -> float | None:
    """``Retry-After`` as seconds: an integer, or an HTTP date."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def _transport_reason(error: httpx.TransportError) -> str:
    reason = str(error) or type(error).__name__
    return reason.splitlines()[0]


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _describe(detail: Any) -> str:
    if isinstance(detail, dict):
        inner = detail.get("message") or detail.get("detail") or detail
        # A structured detail (a quota's 429) carries its own message.
        return _describe(inner) if isinstance(inner, dict) and inner is not detail else str(inner)
    return str(detail)
