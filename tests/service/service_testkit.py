"""Helpers of the service tests: a hand-driven clock, job specs the core accepts and a
running app with two tenants."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from maskd_core.spec import JobSpec
from service.config import Settings
from service.dispatch import embedded_queue_dir
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
