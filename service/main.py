"""The FastAPI application: ``create_app`` wires settings, database, store and dispatcher.

Resources are built in the lifespan, not at import, so ``uvicorn --factory
service.main:create_app`` and tests each get their own, and a process started against an
unmigrated database stops at once with the command that fixes it instead of failing on the first
request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.body_limit import RequestBodyLimit
from service.api.routes import api_router
from service.api.routes.health import router as health_router
from service.api.routes.metrics import router as metrics_router
from service.api.schemas import FieldError, validation_error_body
from service.config import Settings, get_settings
from service.db import check_schema_current, make_autocommit_engine, make_engine, make_sessionmaker
from service.dispatch import Dispatcher, make_celery_app
from service.metrics import ApiMetrics, RequestMetricsMiddleware
from service.store import JobStore
from service.validation_pool import shared_validation_pool


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings`` (default: from ``MASKD_*`` environment variables)."""
    settings = settings or get_settings()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        autocommit = make_autocommit_engine(settings.database_url)
        try:
            await anyio.to_thread.run_sync(check_schema_current, engine)
            store = JobStore(make_sessionmaker(engine), autocommit=autocommit)
            celery_app = make_celery_app(settings, name="maskd-api")
            app.state.settings = settings
            app.state.engine = engine
            app.state.store = store
            app.state.dispatcher = Dispatcher(celery_app, store)
            app.state.validations = shared_validation_pool(settings)
            metrics.watch_database(engine)
            try:
                yield
            finally:
                metrics.forget_database()
                celery_app.close()
        finally:
            autocommit.dispose()
            engine.dispose()

    app = FastAPI(
        title="maskd",
        summary="MasKD distillation jobs as a service",
        version="1",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    # Inside the metrics middleware, so refused bodies are counted too.
    app.add_middleware(
        RequestBodyLimit,
        max_bytes=settings.max_request_bytes,
        max_depth=settings.max_json_depth,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(api_router)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 with one ``{loc, msg, type}`` per problem and a one-line summary.

    FastAPI's default echoes the whole input back per error; this keeps the shape but drops
    the echo and adds ``message``, which reads well in a terminal. The body is
    ``service.api.schemas.ValidationErrorOut``, which the OpenAPI document shows.
    """
    assert isinstance(exc, RequestValidationError)
    problems = [_field_error(error) for error in exc.errors()]
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content=validation_error_body(problems)
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's bare "Not Found"/"Method Not Allowed" gain a hint; other details pass."""
    assert isinstance(exc, StarletteHTTPException)
    detail: Any = exc.detail
    if exc.status_code == status.HTTP_404_NOT_FOUND and detail == "Not Found":
        detail = f"no endpoint at {request.url.path}; the API is under /v1 (see /docs)"
    elif exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        detail = f"{request.method} is not supported on {request.url.path}; see /docs"
    elif exc.status_code == status.HTTP_400_BAD_REQUEST and isinstance(exc.__cause__, ValueError):
        # FastAPI's "There was an error parsing the body": say why (e.g. a 5000-digit number).
        detail = f"the request body is not JSON this service can read: {exc.__cause__}"
    if isinstance(detail, str):
        detail = _printable(detail)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


def _field_error(error: Any) -> FieldError:
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "extra_forbidden":
        message = "unknown field; remove it or check its spelling against the schema"
    loc = [
        part if isinstance(part, int) else _printable(str(part)) for part in error.get("loc", ())
    ]
    return FieldError(loc=loc, msg=_printable(message), type=str(error.get("type", "invalid")))


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: a request can smuggle unpaired surrogates into messages (a
    JSON ``"\\ud800"``), and a response must still encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
