"""Liveness and readiness probes, outside ``/v1`` and without authentication.

``/healthz`` only says the process answers (restart it if not); ``/readyz`` says whether it can
do its work, so a load balancer stops sending traffic while the database, the broker or the
MLflow tracking store is away or the schema has not been migrated yet. Each check is one cheap
call with a short timeout.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, status
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from service.api.deps import DispatcherDep, EngineDep, SettingsDep
from service.api.schemas import Health, Readiness, error_responses
from service.db import check_schema_current

router = APIRouter(tags=["health"], responses=error_responses(413))


@router.get("/healthz")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    responses={503: {"model": Readiness, "description": "A dependency is not usable."}},
)
def readyz(engine: EngineDep, dispatcher: DispatcherDep, settings: SettingsDep) -> JSONResponse:
    """Check the database answers, its schema is current, the broker accepts connections and
    the MLflow tracking store answers (registry reads and ``models:/`` weights need it)."""
    database = _check(lambda: _ping(engine), "unreachable")
    checks = {
        "database": database,
        "schema": (
            _check(lambda: check_schema_current(engine), "not current")
            if database == "ok"
            else "not checked: the database is unreachable"
        ),
        "broker": _check(dispatcher.check_broker, "unreachable"),
        "mlflow": _check(
            lambda: check_mlflow(
                settings.mlflow_tracking_uri, settings.mlflow_check_timeout_seconds
            ),
            "unreachable",
        ),
    }
    ready = all(value == "ok" for value in checks.values())
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    return JSONResponse(
        body.model_dump(),
        status_code=status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE,
    )


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def check_mlflow(tracking_uri: str, timeout: float) -> None:
    """Raise when the MLflow tracking store at ``tracking_uri`` does not answer in ``timeout``.

    A server (``http(s)://``) must answer ``GET <uri>/health``. A SQLite database must open
    read-only and read its schema, or, before any run was logged, be creatable (its folder
    writable: MLflow creates the file on first use). Other database URIs must accept a
    connection; a local folder (file store) must exist.
    """
    if tracking_uri.startswith(("http://", "https://")):
        httpx.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
        return
    try:
        url = make_url(tracking_uri)
    except ArgumentError:
        folder = Path(tracking_uri.removeprefix("file://"))
        if not folder.is_dir():
            raise FileNotFoundError(f"no MLflow file store at {folder}") from None
        return
    if url.get_backend_name() == "sqlite":
        _check_sqlite(url.database, timeout)
        return
    engine = create_engine(url, poolclass=NullPool, connect_args=_connect_timeout(url, timeout))
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def _check_sqlite(database: str | None, timeout: float) -> None:
    if not database or database == ":memory:":
        return
    path = Path(database).resolve()
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise FileNotFoundError(
                f"{path} does not exist and MLflow cannot create it: {path.parent} is not a "
                "writable folder"
            )
        return
    with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=timeout)) as db:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()


def _connect_timeout(url: URL, timeout: float) -> dict[str, Any]:
    if url.get_backend_name() in {"postgresql", "mysql", "mariadb"}:
        return {"connect_timeout": max(1, round(timeout))}
    return {}


def _check(probe: Callable[[], None], what: str) -> str:
    """'ok', or the failure as a reason an operator can act on."""
    try:
        probe()
    except Exception as error:  # any failure is the reason to report, whatever its type
        return f"{what}: {error}"
    return "ok"
