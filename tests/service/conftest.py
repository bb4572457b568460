"""Fixtures of the API and store tests: a controllable clock, valid specs, a running app."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from service_testkit import Api, FakeClock, open_api, store_on_clock

from service.config import Settings
from service.store import JobStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_store(database_url: str, clock: FakeClock) -> Iterator[JobStore]:
    """A store on ``database_url`` whose notion of "now" is ``clock``."""
    with store_on_clock(database_url, clock) as store:
        yield store


@pytest.fixture
def api(service_settings: Settings, job_store: JobStore) -> Iterator[Api]:
    """The app over SQLite and PostgreSQL with the embedded filesystem broker."""
    with open_api(service_settings, job_store) as opened:
        yield opened
