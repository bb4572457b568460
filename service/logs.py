"""Logging of the service processes: one setup, JSON or text lines, the job on every line.

``configure_logging`` is the one setup of ``maskd serve`` (API and reconciler), ``maskd
reconcile`` and ``maskd worker`` (the worker calls it from Celery's ``setup_logging`` signal, so
a worker started as ``celery -A workers.app worker`` gets it too). It installs one handler on
the root logger, writing to stderr, either JSON objects (one per line: ``time``, ``level``,
``logger``, ``message``, ``pid``, ``exception``) or readable text, as ``MASKD_LOG_FORMAT`` says.

While a job is being handled, its id, attempt and stage ride on every record: code that works
on a job enters ``job_log_context(job_id)`` (the worker around an attempt, the reconciler per
job, the API per request on ``/v1/jobs/{job_id}``), and a filter on the handler copies the
context's fields onto each record, whichever logger wrote it (Celery, MLflow, SQLAlchemy...).
The context lives in a ``ContextVar``; its value is a mutable ``JobLogContext``, so a thread
started with a copy of the context (the lease heartbeat) sees the stage move forward too.

MLflow configures its own loggers when imported: a handler writing to ``sys.stderr`` and no
propagation. In a Celery worker, stderr is redirected to a logger at WARNING, so every MLflow
INFO line came out as a WARNING. The setup turns that off (``MLFLOW_CONFIGURE_LOGGING=false``
before MLflow is imported, and MLflow's handlers removed if it already was), so MLflow's records
reach the root handler with their own level and logger name.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["json", "text"]

JOB_FIELDS = ("job_id", "attempt", "stage")
"""The record attributes the job context sets (and the JSON keys they appear under)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s"

_MLFLOW_OWNED_LOGGERS = ("mlflow", "alembic", "huey", "sqlalchemy.engine")
"""The loggers MLflow gives a handler of its own (``mlflow.utils.logging_utils``)."""

_HANDLER_MARK = "_maskd_handler"


@dataclass
class JobLogContext:
    """The job the current code works on; ``attempt`` and ``stage`` are filled in as known."""

    job_id: str
    attempt: int | None = None
    stage: str | None = None


_current_job: ContextVar[JobLogContext | None] = ContextVar("maskd_log_job", default=None)


@contextmanager
def job_log_context(
    job_id: str, *, attempt: int | None = None, stage: str | None = None
) -> Iterator[JobLogContext]:
    """Every record logged inside the block (in this context) carries the job's fields."""
    context = JobLogContext(job_id, attempt, stage)
    token = _current_job.set(context)
    try:
        yield context
    finally:
        _current_job.reset(token)


def bind_job(job_id: str) -> JobLogContext:
    """Puts ``job_id`` on the rest of the current context's records, without an end.

    For contexts that end by themselves, such as an API request's task.
    """
    context = JobLogContext(job_id)
    _current_job.set(context)
    return context


def current_job() -> JobLogContext | None:
    return _current_job.get()


def set_job_stage(stage: str | None) -> None:
    """The job in hand moved to ``stage`` (no-op outside a job context)."""
    context = _current_job.get()
    if context is not None:
        context.stage = stage


class JobContextFilter(logging.Filter):
    """Copies the current job's id, attempt and stage onto each record that lacks them."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current_job.get()
        if context is not None:
            for name in JOB_FIELDS:
                value = getattr(context, name)
                if value is not None and not hasattr(record, name):
                    setattr(record, name, value)
        return True


def _job_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        name: value for name in JOB_FIELDS if (value := getattr(record, name, None)) is not None
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks included, as strings)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_job_fields(record),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with ``[job=… attempt=… stage=…]`` after the message when known."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = _job_fields(record)
        if not fields:
            return line
        job = " ".join(f"{name.removesuffix('_id')}={value}" for name, value in fields.items())
        return f"{line} [{job}]"


def make_handler(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the format and the job filter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(JobContextFilter())
    setattr(handler, _HANDLER_MARK, True)
    return handler


def configure_logging(
    log_format: LogFormat = "json", level: str = "INFO", *, stream: IO[str] | None = None
) -> logging.Handler:
    """Route every logger of this process to one root handler in ``log_format``.

    Replaces the handler an earlier call installed (other root handlers, such as pytest's,
    stay), sets the root level, sends ``warnings`` to logging and routes MLflow's loggers to
    the root handler. Returns the handler.
    """
    root = logging.getLogger()
    for previous in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(previous)
        previous.close()
    handler = make_handler(log_format, stream)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    route_mlflow_logging()
    return handler


def route_mlflow_logging() -> None:
    """Let MLflow's records reach the root handler at their own level (see the module doc).

    MLflow's writes to stdout that are not log records are turned off too, unless set: the
    artifact transfer progress bars (terminal animation) and the run links it prints after a
    run on a tracking server (the job's outputs carry them).
    """
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if "mlflow" in sys.modules:
        for name in _MLFLOW_OWNED_LOGGERS:
            owned = logging.getLogger(name)
            mlflow_handlers = [h for h in owned.handlers if _is_mlflow_handler(h)]
            for handler in mlflow_handlers:
                owned.removeHandler(handler)
            if mlflow_handlers:
                owned.propagate = True
    # What MLflow would have set: alembic's per-connection INFO chatter ("Context impl ...")
    # stays out, and MLFLOW_LOGGING_LEVEL still applies to MLflow's own loggers.
    if logging.getLogger("alembic").level == logging.NOTSET:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow_level = os.environ.get("MLFLOW_LOGGING_LEVEL")
    if mlflow_level:
        logging.getLogger("mlflow").setLevel(mlflow_level.upper())


def _is_mlflow_handler(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return type(stream).__name__ == "MlflowLoggingStream"
