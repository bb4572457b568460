"""``/readyz`` checks the MLflow tracking store beside the database and the broker.

Real stores only: SQLite files, a loopback ``maskd mlflow`` server, a closed port, and a socket
that accepts connections but never answers (the check must give up after its timeout). The job
database does not matter here, so it is SQLite only.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from service_testkit import open_api

from maskd_cli.mlflow_command import mlflow_server_command
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.store import JobStore


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def service_settings(sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=sqlite_url,
        data_dir=tmp_path / "var",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )


@pytest.fixture
def job_store(sqlite_url: str) -> Iterator[JobStore]:
    engine = make_engine(sqlite_url)
    try:
        yield JobStore(make_sessionmaker(engine))
    finally:
        engine.dispose()


def readiness(settings: Settings, store: JobStore) -> tuple[int, dict[str, object]]:
    with open_api(settings, store) as api:
        response = api.http.get("/readyz")
        return response.status_code, response.json()


def test_a_usable_sqlite_tracking_store_is_ready(
    service_settings: Settings, job_store: JobStore, tmp_path: Path
) -> None:
    # Not created yet (MLflow creates it on first use): ready, as the folder is writable.
    status, body = readiness(service_settings, job_store)
    assert status == 200, body
    assert body == {
        "status": "ready",
        "checks": {"database": "ok", "schema": "ok", "broker": "ok", "mlflow": "ok"},
    }

    # An existing SQLite database opens read-only.
    database = tmp_path / "existing-mlflow.db"
    with closing(sqlite3.connect(database)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()
    settings = service_settings.model_copy(update={"mlflow_tracking_uri": f"sqlite:///{database}"})
    assert readiness(settings, job_store)[0] == 200


def test_a_broken_sqlite_tracking_store_is_unavailable(
    service_settings: Settings, job_store: JobStore, tmp_path: Path
) -> None:
    garbage = tmp_path / "mlflow.db"
    garbage.write_bytes(b"this is not a database" * 100)
    missing_folder = tmp_path / "nowhere" / "mlflow.db"
    for uri in (f"sqlite:///{garbage}", f"sqlite:///{missing_folder}"):
        settings = service_settings.model_copy(update={"mlflow_tracking_uri": uri})
        status, body = readiness(settings, job_store)
        assert status == 503, body
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert checks["mlflow"].startswith("unreachable:"), checks
        assert checks["database"] == checks["broker"] == "ok"


def test_an_unreachable_mlflow_server_makes_the_api_unavailable(
    service_settings: Settings, job_store: JobStore
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    settings = service_settings.model_copy(update={"mlflow_tracking_uri": closed})

    status, body = readiness(settings, job_store)

    assert status == 503
    assert body["status"] == "unavailable"
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["mlflow"].startswith("unreachable:"), checks
    assert checks["database"] == checks["schema"] == checks["broker"] == "ok"


def test_a_silent_mlflow_server_is_given_up_on_after_the_timeout(
    service_settings: Settings, job_store: JobStore
) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = service_settings.model_copy(
            update={"mlflow_tracking_uri": uri, "mlflow_check_timeout_seconds": 0.3}
        )
        started = time.monotonic()
        status, body = readiness(settings, job_store)
        elapsed = time.monotonic() - started

    assert status == 503
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert "timed out" in checks["mlflow"].lower(), checks
    assert elapsed < 5.0


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """``maskd mlflow``'s server on a loopback port, over its own SQLite database."""
    port = free_port()
    argv, env = mlflow_server_command(
        f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "served"), port=port
    )
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text()) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_running_mlflow_server_is_ready(
    service_settings: Settings, job_store: JobStore, mlflow_server: str
) -> None:
    settings = service_settings.model_copy(update={"mlflow_tracking_uri": mlflow_server})

    status, body = readiness(settings, job_store)

    assert status == 200, body
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["mlflow"] == "ok"
