"""The FastAPI application: ``create_app`` wires settings, database, store and dispatcher.

Resources are built in the lifespan, not at import, so ``uvicorn --factory
service.main:create_app`` and tests each get their own, and a process started against an
unmigrated database stops at once with the command that fixes it instead of failing on the first
request.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.constants import REF_PREFIX, REF_TEMPLATE
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.body_limit import RequestBodyLimit
from service.api.routes import api_router
from service.api.routes.health import router as health_router
from service.api.routes.metrics import router as metrics_router
from service.api.schemas import ErrorOut, FieldError, error_responses, validation_error_body
from service.api.submission_gate import SubmissionGate
from service.config import Settings, get_settings
from service.db import (
    AUTOCOMMIT_POOL_SIZE,
    check_schema_current,
    make_autocommit_engine,
    make_engine,
    make_sessionmaker,
)
from service.dispatch import Dispatcher, make_celery_app
from service.metrics import ApiMetrics, RequestMetricsMiddleware
from service.store import JobQuotas, JobStore, open_job_reads
from service.submissions import SubmissionWriter, shared_writer_process
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
            app.state.dispatcher = dispatcher = Dispatcher(celery_app, store)
            app.state.validations = shared_validation_pool(settings)
            quotas = JobQuotas(
                max_queued=settings.max_queued_jobs_per_project,
                max_running=settings.max_running_jobs_per_project,
            )
            # With validation in processes, batches are written in one too, off the event
            # loop's interpreter lock (``service.submissions``).
            app.state.submissions = SubmissionWriter(
                store,
                dispatcher,
                quotas,
                process=shared_writer_process() if settings.validation_processes else None,
                settings=settings,
            )
            app.state.reads = await open_job_reads(
                settings.database_url, store, max_connections=AUTOCOMMIT_POOL_SIZE
            )
            metrics.watch_database(engine)
            # What exists now (modules, the app, the pools) lives as long as the process. Out
            # of the collector's reach, it is not walked by every full collection, which
            # otherwise took hundreds of milliseconds here: the reads' tail latency.
            gc.freeze()
            try:
                yield
            finally:
                metrics.forget_database()
                await app.state.reads.close()
                celery_app.close()
        finally:
            autocommit.dispose()
            engine.dispose()

    app = FastAPI(
        title="maskd",
        summary="MasKD distillation jobs as a service",
        version="1",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.metrics = metrics
    # Inside the metrics middleware, so refused bodies are counted too.
    app.add_middleware(
        RequestBodyLimit,
        max_bytes=settings.max_request_bytes,
        max_depth=settings.max_json_depth,
    )
    # Outside the body limit, so a submission waiting for its turn has not been read yet.
    app.add_middleware(
        SubmissionGate,
        in_flight=settings.submissions_in_flight,
        queue_limit=settings.validation_queue_limit,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(api_router)
    _document_body_errors(app)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


def operation_id(route: APIRoute) -> str:
    """The route's handler name in camelCase (``submit_job`` → ``submitJob``): what a client
    generated from /openapi.json names its methods, and what the OpenAPI links point at.

    FastAPI's default also spells the path and method (``submit_job_v1_jobs_post``), names no
    client should carry. Handler names are unique across routers, so these are too.
    """
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def _document_body_errors(app: FastAPI) -> None:
    """Document 400 (not readable as JSON) and 415 (not sent as JSON) on every operation that
    reads a body, as this module's handlers send them for all: one place, new routes included.

    Added to the generated document rather than to each route's ``responses``: FastAPI builds
    included routes lazily, so they are not there to amend before the first request.
    """
    build_document = app.openapi
    error_schema = {"$ref": f"{REF_PREFIX}{ErrorOut.__name__}"}

    def document_with_body_errors() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build_document()  # FastAPI keeps it as app.openapi_schema: amended in place
        document["components"]["schemas"].setdefault(
            ErrorOut.__name__, ErrorOut.model_json_schema(ref_template=REF_TEMPLATE)
        )
        for operations in document["paths"].values():
            for operation in operations.values():
                if "requestBody" not in operation:
                    continue
                for code, response in error_responses(400, 415).items():
                    operation["responses"].setdefault(
                        str(code),
                        {
                            "description": response["description"],
                            "content": {"application/json": {"schema": error_schema}},
                        },
                    )
        return document

    app.openapi = document_with_body_errors  # type: ignore[method-assign]


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """422 with one ``{loc, msg, type}`` per problem and a one-line summary.

    FastAPI's default echoes the whole input back per error; this keeps the shape but drops
    the echo and adds ``message``, which reads well in a terminal. The body is
    ``service.api.schemas.ValidationErrorOut``, which the OpenAPI document shows.
    """
    assert isinstance(exc, RequestValidationError)
    if any(_unread_body(error) for error in exc.errors()):
        sent = request.headers.get("content-type") or "no Content-Type"
        detail = (
            f"the request body was sent as {_printable(sent)}; send it as JSON with "
            "`Content-Type: application/json` (`maskd jobs submit` turns a YAML spec into JSON)"
        )
        return JSONResponse(
            status_code=status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            content=ErrorOut(detail=detail).model_dump(),
        )
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


def _unread_body(error: Any) -> bool:
    """FastAPI hands a body it did not read as JSON (another or no ``Content-Type``) to the
    model as raw bytes, which fail as "not a dictionary": a 422 that blames the spec for what
    is the media type."""
    return tuple(error.get("loc", ())) == ("body",) and isinstance(error.get("input"), bytes)


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
