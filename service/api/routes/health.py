"""Liveness and readiness probes, outside ``/v1`` and without authentication.

``/healthz`` only says the process answers (restart it if not); ``/readyz`` says whether it can
do its work, so a load balancer stops sending traffic while the database or broker is away or
the schema has not been migrated yet.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, status
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

from service.api.deps import DispatcherDep, EngineDep
from service.api.schemas import Health, Readiness
from service.db import check_schema_current

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    responses={503: {"model": Readiness, "description": "A dependency is not usable."}},
)
def readyz(engine: EngineDep, dispatcher: DispatcherDep) -> JSONResponse:
    """Check the database answers, its schema is current and the broker accepts connections."""
    database = _check(lambda: _ping(engine), "unreachable")
    checks = {
        "database": database,
        "schema": (
            _check(lambda: check_schema_current(engine), "not current")
            if database == "ok"
            else "not checked: the database is unreachable"
        ),
        "broker": _check(dispatcher.check_broker, "unreachable"),
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


def _check(probe: Callable[[], None], what: str) -> str:
    """'ok', or the failure as a reason an operator can act on."""
    try:
        probe()
    except Exception as error:  # any failure is the reason to report, whatever its type
        return f"{what}: {error}"
    return "ok"
