"""Helpers of the service tests: a hand-driven clock, job specs the core accepts, a
running app with two tenants and a reader that follows a job's event stream live."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from fastapi.testclient import TestClient

from maskd_core.spec import JobSpec
from service.client import MaskdClient
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.dispatch import embedded_queue_dir
from service.lifecycle import JobState
from service.main import create_app
from service.store import JobStore, ProjectRecord


class FakeClock:
    """A clock the test moves by hand, so lease expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@contextmanager
def store_on_clock(database_url: str, clock: FakeClock) -> Iterator[JobStore]:
    """A store on ``database_url`` whose notion of "now" is ``clock``."""
    engine = make_engine(database_url)
    try:
        yield JobStore(make_sessionmaker(engine), clock=clock)
    finally:
        engine.dispose()


def spec_body(name: str = "tiny-seg", **overrides: Any) -> dict[str, Any]:
    """A small segmentation job that ``maskd_core.validate.validate_job`` accepts."""
    body: dict[str, Any] = {
        "name": name,
        "task": "segmentation",
        "teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone"]},
        "student": {"arch": "seg_tiny_student", "layers": ["backbone"]},
        "dataset": {"name": "procedural_shapes"},
        "stage1": {"iterations": 4},
        "stage2": {"iterations": 6},
        "batch_size": 2,
    }
    body.update(overrides)
    return body


def make_spec(name: str = "tiny-seg", **overrides: Any) -> JobSpec:
    return JobSpec.model_validate(spec_body(name, **overrides))


@dataclass
class Api:
    """A running app with two tenants' keys, plus direct access to its store and broker."""

    http: TestClient
    store: JobStore
    settings: Settings
    key: str
    other_key: str
    project: ProjectRecord

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def queued_messages(self) -> list[Path]:
        """Messages waiting in the embedded broker's folder (the real broker, not a mock)."""
        return sorted(embedded_queue_dir(self.settings).glob("*.msg"))


@contextmanager
def open_api(settings: Settings, store: JobStore) -> Iterator[Api]:
    """Start the app (lifespan included) with keys for projects 'acme' and 'globex'."""
    key = store.create_api_key("acme")
    other_key = store.create_api_key("globex")
    project = store.create_project("acme")
    with TestClient(create_app(settings)) as http:
        yield Api(http, store, settings, key, other_key, project)


StreamItem = tuple[str, dict[str, Any]]


class LiveEventStream:
    """A job's ``/v1/jobs/{id}/events/stream``, read on a thread as the server sends it.

    The test changes the job between reads and calls ``catch_up`` to wait (``timeout``
    seconds at most) until that change has reached the client. The job is then still
    running, so a server that held the stream back until the job ended (buffering it, or
    yielding only at the end) fails the first ``catch_up`` instead of passing at the end.
    Leaving the ``with`` block fails a job that is not finished yet, so the stream and its
    reader end even when the test stopped halfway.
    """

    def __init__(self, api: Api, job_id: str, timeout: float = 10.0) -> None:
        self.received: list[StreamItem] = []
        self._api = api
        self._job_id = job_id
        self._timeout = timeout
        self._items: queue.Queue[StreamItem | Exception | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"sse-{job_id}", daemon=True)

    def __enter__(self) -> LiveEventStream:
        self._reader.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Refused (a no-op) when the job already finished, as it does when the test passes.
        self._api.store.transition(
            self._job_id, JobState.FAILED, worker_id=None, message="the test stopped early"
        )
        self._reader.join(self._timeout)

    def catch_up(self) -> None:
        """Wait until the stream has shown the job as the store holds it now: its latest
        event, and its state, stage, progress and metrics."""
        store, project_id = self._api.store, self._api.project.id
        job = store.get_job(project_id, self._job_id)
        assert job is not None
        latest = store.list_events(project_id, self._job_id)[-1].id
        expected = {
            "state": job.state.value,
            "stage": job.stage,
            "progress": job.progress,
            "metrics": job.metrics,
        }
        waiting_for = f"event {latest} and progress {expected}"
        deadline = time.monotonic() + self._timeout
        while not self._shows(latest, expected):
            if self._next(deadline, waiting_for) is None:
                raise AssertionError(f"the stream ended before {waiting_for}")

    def read_to_end(self) -> list[StreamItem]:
        """Everything the stream sent, once the server has closed it."""
        deadline = time.monotonic() + self._timeout
        while self._next(deadline, "the end of the stream") is not None:
            pass
        self._reader.join(self._timeout)
        return self.received

    def _read(self) -> None:
        client = MaskdClient(self._api.http, self._api.key)
        try:
            for item in client.stream_events(self._job_id):
                self._items.put(item)
        except Exception as error:  # handed to the test's thread, which raises it
            self._items.put(error)
        self._items.put(None)

    def _next(self, deadline: float, waiting_for: str) -> StreamItem | None:
        try:
            item = self._items.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise AssertionError(
                f"nothing arrived in {self._timeout} s while waiting for {waiting_for}: "
                "the stream does not deliver events as they are written"
            ) from None
        if isinstance(item, Exception):
            raise AssertionError("reading the event stream failed") from item
        if item is not None:
            self.received.append(item)
        return item

    def _shows(self, event_id: int, expected: dict[str, Any]) -> bool:
        ids = [data["id"] for name, data in self.received if name in ("transition", "info")]
        snapshots = [data for name, data in self.received if name == "progress"]
        return (
            bool(ids)
            and ids[-1] >= event_id
            and bool(snapshots)
            and all(snapshots[-1].get(key) == value for key, value in expected.items())
        )
