"""The FastAPI application: ``create_app`` wires settings, database, store and dispatcher.

Resources are built in the lifespan, not at import, so ``uvicorn --factory
service.main:create_app`` and tests each get their own, and a process started against an
unmigrated database stops at once with the command that fixes it instead of failing on the first
request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.routes import api_router
from service.api.routes.health import router as health_router
from service.api.routes.metrics import router as metrics_router
from service.config import Settings, get_settings
from service.db import check_schema_current, make_engine, make_sessionmaker
from service.dispatch import Dispatcher, make_celery_app
from service.metrics import ApiMetrics, RequestMetricsMiddleware
from service.store import JobStore

INVALID_REQUEST_HINT = (
    "fix the fields listed in detail and resend; the job spec schema is at /docs and /openapi.json"
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings`` (default: from ``MASKD_*`` environment variables)."""
    settings = settings or get_settings()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        try:
            await anyio.to_thread.run_sync(check_schema_current, engine)
            store = JobStore(make_sessionmaker(engine))
            celery_app = make_celery_app(settings, name="maskd-api")
            app.state.settings = settings
            app.state.engine = engine
            app.state.store = store
            app.state.dispatcher = Dispatcher(celery_app, store)
            metrics.watch_database(engine)
            try:
                yield
            finally:
                metrics.forget_database()
                celery_app.close()
        finally:
            engine.dispose()

    app = FastAPI(
        title="maskd",
        summary="MasKD distillation jobs as a service",
        version="1",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
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
    the echo and adds ``message``, which reads well in a terminal.
    """
    assert isinstance(exc, RequestValidationError)
    detail = [_error_item(error) for error in exc.errors()]
    summary = "; ".join(f"{_dotted(item['loc'])}: {item['msg']}" for item in detail)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={
            "detail": detail,
            "message": f"invalid request: {summary}. {INVALID_REQUEST_HINT}",
        },
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's bare "Not Found"/"Method Not Allowed" gain a hint; other details pass."""
    assert isinstance(exc, StarletteHTTPException)
    detail: Any = exc.detail
    if exc.status_code == status.HTTP_404_NOT_FOUND and detail == "Not Found":
        detail = f"no endpoint at {request.url.path}; the API is under /v1 (see /docs)"
    elif exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        detail = f"{request.method} is not supported on {request.url.path}; see /docs"
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


def _error_item(error: Any) -> dict[str, Any]:
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "extra_forbidden":
        message = "unknown field; remove it or check its spelling against the schema"
    return {"loc": list(error.get("loc", ())), "msg": message, "type": error.get("type")}


def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"
