"""A small synchronous client for the maskd API, used by the CLI, the demo and the tests.

It wraps any ``httpx.Client`` (a plain one for a real server, Starlette's ``TestClient`` in
tests), returns the JSON bodies as dicts and turns every error response into ``ApiError``
carrying the server's explanation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx

from maskd_core.spec import JobSpec

TERMINAL_STATES = frozenset({"SUCCEEDED", "CANCELLED", "FAILED"})


class ApiError(Exception):
    """An error response; ``detail`` is the server's body (what is wrong and how to fix it)."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {_describe(detail)}")
        self.status_code = status_code
        self.detail = detail


class MaskdClient:
    """Calls the API with a project's key.

    ``MaskdClient.connect(url, key)`` opens its own connection pool (close it, or use it as a
    context manager); ``MaskdClient(http, key)`` reuses an existing ``httpx.Client``.
    """

    def __init__(self, http: httpx.Client, api_key: str | None) -> None:
        self._http = http
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @classmethod
    def connect(cls, base_url: str, api_key: str | None, timeout: float = 60.0) -> MaskdClient:
        return cls(httpx.Client(base_url=base_url, timeout=timeout), api_key)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MaskdClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit_job(
        self, spec: JobSpec | dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a job; with the key of an earlier submission, that job comes back."""
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=body, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")

    def list_jobs(
        self,
        *,
        states: list[str] | None = None,
        name: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page: ``{"data": [...], "next_cursor": ...}``."""
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = states
        if name is not None:
            params["name"] = name
        if created_after is not None:
            params["created_after"] = created_after.isoformat()
        if created_before is not None:
            params["created_before"] = created_before.isoformat()
        if cursor is not None:
            params["cursor"] = cursor
        return self._request("GET", "/v1/jobs", params=params)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")

    def list_events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        page = self._request("GET", f"/v1/jobs/{job_id}/events", params={"after": after})
        events: list[dict[str, Any]] = page["data"]
        return events

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Follow the job's server-sent events as ``(event, data)`` until it is terminal."""
        with self._http.stream(
            "GET",
            f"/v1/jobs/{job_id}/events/stream",
            params={"after": after},
            headers=self._headers,
            timeout=httpx.Timeout(None, connect=10.0),
        ) as response:
            if response.is_error:
                response.read()
                raise ApiError(response.status_code, _body(response))
            event, data = "message", ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data += line.removeprefix("data:").strip()
                elif not line and data:
                    yield event, json.loads(data)
                    event, data = "message", ""

    def wait(self, job_id: str, timeout: float, poll_seconds: float = 1.0) -> dict[str, Any]:
        """Poll until the job is terminal; raises ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["state"] in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll_seconds)

    def healthz(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def readyz(self) -> dict[str, Any]:
        """The readiness report; raises ``ApiError`` (503) with it when not ready."""
        return self._request("GET", "/readyz")

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        response = self._http.request(method, path, headers=headers, **kwargs)
        if response.is_error:
            raise ApiError(response.status_code, _body(response))
        body: dict[str, Any] = response.json()
        return body


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
