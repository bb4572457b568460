"""Fixtures of the worker tests: the production shape (PostgreSQL + Redis) with real workers.

The Redis database is not the shared ``redis_url`` one (db 15) but its neighbour: these tests
run workers that consume every message on the ``gpu`` queue and flush the database, which must
not disturb the API tests' assertions on queued messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from worker_testkit import FAST_SETTINGS, Stack

from service.client import MaskdClient
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.dispatch import Dispatcher, make_celery_app
from service.main import create_app
from service.store import JobStore

WORKER_REDIS_DB = 14


@pytest.fixture(scope="session")
def mlflow_tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow database for the session: creating its schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def worker_broker_url(redis_url: str) -> Iterator[str]:
    """A flushed Redis database of the worker tests' own (see the module docstring)."""
    url = f"{redis_url.rsplit('/', 1)[0]}/{WORKER_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def worker_settings(
    migrated_postgres_url: str, worker_broker_url: str, mlflow_tracking_uri: str, tmp_path: Path
) -> Settings:
    return Settings(
        database_url=migrated_postgres_url,
        broker_url=worker_broker_url,
        data_dir=tmp_path / "var",
        mlflow_tracking_uri=mlflow_tracking_uri,
        **FAST_SETTINGS,
    )


@pytest.fixture
def stack(worker_settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """The API in process, the store, a dispatcher, and workers the test starts itself.

    Workers are SIGKILLed at teardown, and their logs printed (pytest shows them on failure).
    """
    engine = make_engine(worker_settings.database_url)
    store = JobStore(make_sessionmaker(engine))
    key = store.create_api_key("workers-test")
    celery_app = make_celery_app(worker_settings, name="maskd-test-reconciler")
    with TestClient(create_app(worker_settings)) as http:
        opened = Stack(
            settings=worker_settings,
            store=store,
            client=MaskdClient(http, key),
            dispatcher=Dispatcher(celery_app, store),
            log_dir=tmp_path,
        )
        try:
            yield opened
        finally:
            for worker in opened.workers:
                worker.kill()
            print(opened.worker_logs())
            celery_app.close()
            engine.dispose()
