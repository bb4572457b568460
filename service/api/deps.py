"""Request dependencies as ``Annotated`` aliases, so routes declare what they need by type.

Everything comes from ``app.state``, which ``service.main.create_app``'s lifespan fills once per
process: routes never build engines, stores or Celery apps themselves. Those lookups are
``async def`` because FastAPI runs every plain ``def`` dependency in its thread pool, and a
thread hop costs more than the lookup; only dependencies that block (the key check reads the
database) stay plain functions. The hot reads take the bare key (``ApiKeyDep``) instead of
``CurrentProject`` and check it in their own round trip (``ReadsDep``), with the same answers
(``caller``, ``refusing_ended_keys``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar, cast

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from service.config import Settings
from service.dispatch import Dispatcher
from service.metrics import ApiMetrics
from service.store import ApiKeyRejected, JobReads, JobStore, ProjectRecord
from service.submissions import SubmissionWriter
from service.validation_pool import ValidationPool

T = TypeVar("T")

GET_A_KEY = (
    "create one with `maskd admin create-key --project NAME` and send it as "
    "`Authorization: Bearer <key>`"
)

_bearer = HTTPBearer(
    auto_error=False,
    description="A project API key (`mk_...`); create one with "
    "`maskd admin create-key --project NAME`.",
)


def _app_state(name: str, kind: type[T]) -> Callable[[Request], Awaitable[T]]:
    """A dependency answering ``app.state.<name>``, the ``kind`` the lifespan put there."""

    async def lookup(request: Request) -> T:
        return cast(T, getattr(request.app.state, name))

    lookup.__name__ = f"app_state_{name}"
    return lookup


SettingsDep = Annotated[Settings, Depends(_app_state("settings", Settings))]
EngineDep = Annotated[Engine, Depends(_app_state("engine", Engine))]
StoreDep = Annotated[JobStore, Depends(_app_state("store", JobStore))]
DispatcherDep = Annotated[Dispatcher, Depends(_app_state("dispatcher", Dispatcher))]
MetricsDep = Annotated[ApiMetrics, Depends(_app_state("metrics", ApiMetrics))]
ValidationsDep = Annotated[ValidationPool, Depends(_app_state("validations", ValidationPool))]
ReadsDep = Annotated[JobReads, Depends(_app_state("reads", JobReads))]
SubmissionsDep = Annotated[SubmissionWriter, Depends(_app_state("submissions", SubmissionWriter))]


async def _api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The request's bearer key, unchecked (401 when there is none): for the reads that check
    it in the same round trip as they read (``JobReads``)."""
    if credentials is None:
        raise _unauthorized(f"missing API key: {GET_A_KEY}")
    return credentials.credentials


ApiKeyDep = Annotated[str, Depends(_api_key)]


def _current_project(store: StoreDep, key: ApiKeyDep) -> ProjectRecord:
    """The project owning the request's API key; 401 (with how to get a key) otherwise."""
    with refusing_ended_keys():
        return caller(store.authenticate(key))


@contextmanager
def refusing_ended_keys() -> Iterator[None]:
    """401 for a revoked or expired key (raised by a key check inside the block).

    It is told so (it was once valid: its holder needs a new one), and nothing else: not its
    project, nor anything about other keys.
    """
    try:
        yield
    except ApiKeyRejected as error:
        raise _unauthorized(
            f"{error}; it can no longer be used. Ask your administrator for a new key: {GET_A_KEY}"
        ) from error


def caller(project: ProjectRecord | None) -> ProjectRecord:
    """The project a key check found; 401 for an unknown, malformed or wrong key."""
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
