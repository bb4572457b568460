"""Fixtures of the API and store tests: a controllable clock, valid specs, a running app."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_fakes import FakeClock

from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.dispatch import embedded_queue_dir
from service.main import create_app
from service.store import JobStore, ProjectRecord


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_store(database_url: str, clock: FakeClock) -> Iterator[JobStore]:
    """A store on ``database_url`` whose notion of "now" is ``clock``."""
    engine = make_engine(database_url)
    try:
        yield JobStore(make_sessionmaker(engine), clock=clock)
    finally:
        engine.dispose()


@pytest.fixture
def project(job_store: JobStore) -> ProjectRecord:
    return job_store.create_project("acme")


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


def open_api(settings: Settings, store: JobStore) -> Iterator[Api]:
    key = store.create_api_key("acme")
    other_key = store.create_api_key("globex")
    project = store.create_project("acme")
    with TestClient(create_app(settings)) as http:
        yield Api(http, store, settings, key, other_key, project)


@pytest.fixture
def api(service_settings: Settings, job_store: JobStore) -> Iterator[Api]:
    """The app over SQLite and PostgreSQL with the embedded filesystem broker."""
    yield from open_api(service_settings, job_store)
