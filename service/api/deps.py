"""Request dependencies as ``Annotated`` aliases, so routes declare what they need by type.

Everything comes from ``app.state``, which ``service.main.create_app``'s lifespan fills once per
process: routes never build engines, stores or Celery apps themselves. Those lookups are
``async def`` because FastAPI runs every plain ``def`` dependency in its thread pool, and a
thread hop costs more than the lookup; only dependencies that block (the key check reads the
database) stay plain functions.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from service.config import Settings
from service.dispatch import Dispatcher
from service.metrics import ApiMetrics
from service.store import ApiKeyRejected, JobStore, ProjectRecord
from service.validation_pool import ValidationPool

GET_A_KEY = (
    "create one with `maskd admin create-key --project NAME` and send it as "
    "`Authorization: Bearer <key>`"
)

_bearer = HTTPBearer(
    auto_error=False,
    description="A project API key (`mk_...`); create one with "
    "`maskd admin create-key --project NAME`.",
)


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def _store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


async def _dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


async def _metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


async def _validations(request: Request) -> ValidationPool:
    validations: ValidationPool = request.app.state.validations
    return validations


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
StoreDep = Annotated[JobStore, Depends(_store)]
DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
MetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
ValidationsDep = Annotated[ValidationPool, Depends(_validations)]


def _current_project(
    store: StoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ProjectRecord:
    """The project owning the request's API key; 401 (with how to get a key) otherwise.

    A revoked or expired key is told so (it was once valid: its holder needs a new one), and
    nothing else: not its project, nor anything about other keys.
    """
    if credentials is None:
        raise _unauthorized(f"missing API key: {GET_A_KEY}")
    try:
        project = store.authenticate(credentials.credentials)
    except ApiKeyRejected as error:
        raise _unauthorized(
            f"{error}; it can no longer be used. Ask your administrator for a new key: {GET_A_KEY}"
        ) from error
    if project is None:
        raise _unauthorized(f"unknown API key: {GET_A_KEY}")
    return project


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": "Bearer"},
    )


CurrentProject = Annotated[ProjectRecord, Depends(_current_project)]
