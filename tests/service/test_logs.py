"""``service.logs``: JSON (or text) lines with the job's id, attempt and stage on each line.

The setup is the one ``maskd serve``/``worker``/``reconcile`` call, writing to a string stream;
the lines come from the real code that logs them: a lease heartbeat thread, the reconciler, an
API request, and MLflow's own loggers as MLflow configures them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from service_testkit import Api, FakeClock, make_spec

from service.config import Settings
from service.dispatch import Dispatcher, make_celery_app
from service.lifecycle import JobState
from service.logs import (
    LogFormat,
    configure_logging,
    job_log_context,
    set_job_stage,
)
from service.store import JobStore
from workers.lease import LeaseKeeper, StopReason
from workers.reconciler import reconcile_once

MLFLOW_LOGGERS = ("mlflow", "alembic", "huey", "sqlalchemy.engine")
ReadLines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def logged() -> Iterator[Callable[[LogFormat], io.StringIO]]:
    """Configures logging into a string stream; puts logging and the environment back after."""
    root = logging.getLogger()
    saved_level = root.level
    saved = {
        name: (logger.level, list(logger.handlers), logger.propagate)
        for name in MLFLOW_LOGGERS
        if (logger := logging.getLogger(name))
    }
    saved_environ = dict(os.environ)
    handlers: list[logging.Handler] = []

    def configure(log_format: LogFormat) -> io.StringIO:
        stream = io.StringIO()
        handlers.append(configure_logging(log_format, "INFO", stream=stream))
        return stream

    try:
        yield configure
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(saved_level)
        logging.captureWarnings(False)
        for name, (level, old_handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.handlers = old_handlers
            logger.propagate = propagate
        os.environ.clear()
        os.environ.update(saved_environ)


@pytest.fixture
def json_lines(logged: Callable[[LogFormat], io.StringIO]) -> ReadLines:
    stream = logged("json")
    return lambda: [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_job_id_attempt_and_stage(json_lines: ReadLines) -> None:
    log = logging.getLogger("maskd.test")
    log.info("before any job")
    with job_log_context("job-1", attempt=2):
        log.info("claimed")
        set_job_stage("stage2/mgd/seed1")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("step failed")
    log.warning("after the job")

    lines = json_lines()

    assert [line["message"] for line in lines] == [
        "before any job",
        "claimed",
        "step failed",
        "after the job",
    ]
    before, claimed, failed, after = lines
    assert "job_id" not in before and "job_id" not in after
    assert claimed["job_id"] == "job-1" and claimed["attempt"] == 2 and "stage" not in claimed
    assert (failed["job_id"], failed["attempt"], failed["stage"]) == (
        "job-1",
        2,
        "stage2/mgd/seed1",
    )
    assert failed["level"] == "ERROR" and failed["logger"] == "maskd.test"
    assert "RuntimeError: boom" in failed["exception"]
    assert after["level"] == "WARNING" and after["time"].endswith("+00:00")


def test_text_lines_name_the_job(logged: Callable[[LogFormat], io.StringIO]) -> None:
    stream = logged("text")
    with job_log_context("job-7", attempt=1, stage="stage1"):
        logging.getLogger("maskd.test").info("step %d", 3)

    line = stream.getvalue().strip()

    assert " INFO " in line and "maskd.test: step 3" in line
    assert line.endswith("[job=job-7 attempt=1 stage=stage1]")


def test_the_lease_heartbeat_thread_logs_under_the_job(
    json_lines: ReadLines, job_store: JobStore
) -> None:
    # The job does not exist, so the first heartbeat reports the lease lost, from its thread.
    with job_log_context("job-gone", attempt=3):
        lease = LeaseKeeper(job_store, "job-gone", "w1", lease_seconds=5, interval_seconds=0.2)
        with lease:
            set_job_stage("stage2")  # after the thread started: it still sees the change
            deadline = time.monotonic() + 10
            while lease.stop_reason is None and time.monotonic() < deadline:
                time.sleep(0.05)
    assert lease.stop_reason is StopReason.LEASE_LOST

    (lost,) = [line for line in json_lines() if "lease lost" in line["message"]]

    assert (lost["job_id"], lost["attempt"], lost["stage"]) == ("job-gone", 3, "stage2")


def test_reconciler_lines_carry_the_job(
    json_lines: ReadLines,
    clocked_store: JobStore,
    clock: FakeClock,
    service_settings: Settings,
) -> None:
    project = clocked_store.create_project("acme")
    job, _ = clocked_store.create_job(project.id, make_spec())
    assert clocked_store.claim(job.id, "w1", lease_seconds=5) is not None
    assert clocked_store.transition(job.id, JobState.STAGE1, worker_id="w1")
    clock.advance(60)  # the worker died: its lease lapsed
    celery_app = make_celery_app(service_settings, name="maskd-test-reconciler")
    try:
        report = reconcile_once(
            clocked_store, Dispatcher(celery_app, clocked_store), service_settings, clock.now
        )
    finally:
        celery_app.close()
    assert report.requeued == [job.id]

    (requeued,) = [line for line in json_lines() if "lost its worker" in line["message"]]

    assert (requeued["job_id"], requeued["attempt"], requeued["stage"]) == (job.id, 1, "stage1")
    assert requeued["logger"] == "workers.reconciler"


def test_api_lines_about_a_job_carry_its_id(json_lines: ReadLines, api: Api) -> None:
    job, _ = api.store.create_job(api.project.id, make_spec())

    response = api.http.post(f"/v1/jobs/{job.id}/cancel", headers=api.headers())

    assert response.status_code == 202
    (cancel,) = [line for line in json_lines() if "cancel requested" in line["message"]]
    assert cancel["job_id"] == job.id
    assert cancel["logger"] == "service.api.routes.jobs"


def test_mlflow_records_keep_their_level(logged: Callable[[LogFormat], io.StringIO]) -> None:
    from mlflow.utils.logging_utils import _configure_mlflow_loggers

    # What importing mlflow does: its own stderr handler, no propagation. Under a Celery worker
    # stderr is a logger at WARNING, which turned every MLflow INFO line into a WARNING.
    _configure_mlflow_loggers(root_module_name="mlflow")  # type: ignore[no-untyped-call]
    stream = logged("json")
    assert os.environ["MLFLOW_CONFIGURE_LOGGING"] == "false"  # for an MLflow imported later
    assert logging.getLogger("mlflow").propagate and not logging.getLogger("mlflow").handlers
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]

    assert [(line["level"], line["logger"], line["message"]) for line in lines] == [
        ("INFO", "mlflow.store.db.utils", "Creating initial MLflow database tables...")
    ], "MLflow's INFO stays INFO; alembic's per-connection chatter stays out, as with MLflow"
