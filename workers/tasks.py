"""``maskd.run_job``: run one MasKD job under a database lease, at most once at a time.

Celery delivers at least once (a late-acked message comes back after a crash or a visibility
timeout, the reconciler re-sends lost ones), so the task makes each delivery safe on its own:
it runs only after winning a compare-and-set claim on the job row, keeps the claim alive with a
heartbeat, resumes from the checkpoints in the job's work directory, and maps every way a run
ends onto the job lifecycle. A delivery that loses the claim does nothing.

torch and the core runner are imported inside ``execute_job``, i.e. in the prefork child that
runs the job, never in the worker's parent.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from maskd_core.spec import JobSpec
from service.config import Settings, get_settings
from service.db import make_engine, make_sessionmaker
from service.lifecycle import FailureKind, JobState, can_transition
from service.store import JobStore
from workers.app import app
from workers.lease import LeaseKeeper, StopReason
from workers.reporting import StoreReporter, format_metrics

if TYPE_CHECKING:
    from maskd_core.runner import ComparisonResult, JobResult
    from workers.tracking import MlflowTracker

    Result = JobResult | ComparisonResult

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Starts a job gets before it is failed instead of re-run. A job that kills its worker every
time (out of memory, the hard time limit) would otherwise be re-queued by the reconciler
forever; a worker lost now and then is well within it."""

TOKENS_FILE = "tokens.pt"
"""Written by the core when stage 1 finishes (see docs/architecture.md)."""


def new_worker_id() -> str:
    """Unique per delivery, so two deliveries in one process can never share a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def time_limit_message(settings: Settings) -> str:
    return (
        f"the job ran past its time limit of {settings.job_soft_time_limit_seconds} s; "
        "resubmit it with fewer iterations, or ask an operator to raise "
        "MASKD_JOB_SOFT_TIME_LIMIT_SECONDS"
    )


def resume_state(workdir: Path, spec: JobSpec) -> JobState:
    """Where a run starts: stage 2 once stage 1's tokens exist, or for methods without any."""
    from maskd_core.methods import job_needs_tokens

    if not job_needs_tokens(spec) or (workdir / TOKENS_FILE).exists():
        return JobState.STAGE2
    return JobState.STAGE1


# Celery ships no type hints, so its decorator is untyped to mypy.
@app.task(name="maskd.run_job", bind=True, acks_late=True)  # type: ignore[untyped-decorator]
def run_job(self: Task, job_id: str) -> str:
    """Celery entry point; returns the state the job was left in (for worker logs only)."""
    settings = get_settings()
    engine = make_engine(settings.database_url)
    try:
        store = JobStore(make_sessionmaker(engine))
        return execute_job(store, settings, job_id, delivery=str(self.request.id))
    finally:
        engine.dispose()


def execute_job(store: JobStore, settings: Settings, job_id: str, *, delivery: str) -> str:
    worker_id = new_worker_id()
    record = store.claim(job_id, worker_id, settings.lease_seconds)
    if record is None:
        logger.info(
            "job %s: not claimed by delivery %s (finished, cancelled or leased elsewhere)",
            job_id,
            delivery,
        )
        return "skipped"
    logger.info("job %s: claimed by %s (attempt %s)", job_id, worker_id, record.attempt)
    if record.attempt > MAX_ATTEMPTS:
        store.transition(
            job_id,
            JobState.FAILED,
            worker_id=worker_id,
            failure_kind=FailureKind.INFRASTRUCTURE,
            message=f"its worker was lost {record.attempt - 1} times (crash, out of memory or "
            "the hard time limit); not retried again. The job's events say where each "
            "attempt stopped",
        )
        return JobState.FAILED.value
    lease = LeaseKeeper(
        store,
        job_id,
        worker_id,
        lease_seconds=settings.lease_seconds,
        interval_seconds=settings.heartbeat_seconds,
        time_limit_seconds=settings.job_soft_time_limit_seconds,
    )
    try:
        with lease:
            return _run_claimed(
                store,
                settings,
                job_id,
                worker_id,
                record.spec,
                record.state,
                lease,
                project_id=record.project_id,
            )
    finally:
        store.release_lease(job_id, worker_id)


def _run_claimed(
    store: JobStore,
    settings: Settings,
    job_id: str,
    worker_id: str,
    spec: JobSpec,
    state: JobState,
    lease: LeaseKeeper,
    *,
    project_id: str,
) -> str:
    workdir = settings.jobs_dir / job_id
    workdir.mkdir(parents=True, exist_ok=True)
    start = resume_state(workdir, spec)
    if state != start and can_transition(state, start):
        if not store.transition(job_id, start, worker_id=worker_id):
            logger.warning("job %s: could not start %s, leaving it", job_id, start)
            return "skipped"
        state = start
    reporter = StoreReporter(store, job_id, worker_id, lease, state=state)

    def fail(kind: FailureKind, message: str) -> str:
        store.transition(
            job_id, JobState.FAILED, worker_id=worker_id, message=message, failure_kind=kind
        )
        return JobState.FAILED.value

    # Imported here, in the child process: see the module docstring.
    from maskd_core.errors import DataError, JobCancelled, SpecError
    from maskd_core.runner import run_comparison
    from maskd_core.runner import run_job as run_core_job

    try:
        with _tracked(store, settings, job_id, project_id, spec, workdir) as (tracker, resolved):
            run = run_core_job if resolved.comparison is None else run_comparison
            result: Result = run(resolved, workdir, callbacks=[reporter, tracker])
            return _register(
                store, job_id, worker_id, result, publish=_publisher(settings, tracker)
            )
    except JobCancelled as stopped:
        if lease.stop_reason is StopReason.LEASE_LOST:
            logger.warning("job %s: stopped at %s after losing the lease", job_id, stopped)
            return "lease_lost"
        if lease.stop_reason is StopReason.TIME_LIMIT:
            return fail(FailureKind.TIMEOUT, f"{time_limit_message(settings)} ({stopped})")
        # The API normally set CANCELLING already; this covers a stop the worker initiated.
        store.transition(job_id, JobState.CANCELLING, worker_id=worker_id)
        cancelled = store.transition(
            job_id,
            JobState.CANCELLED,
            worker_id=worker_id,
            message=f"{stopped}; checkpoint kept in the job's work directory",
        )
        return JobState.CANCELLED.value if cancelled else "lease_lost"
    except SpecError as error:
        where = f" (field {error.field})" if error.field else ""
        return fail(FailureKind.VALIDATION, f"{error}{where}")
    except DataError as error:
        return fail(FailureKind.USER, str(error))
    except SoftTimeLimitExceeded:
        # The backstop fired: the loop stopped polling (stuck in an evaluation, say).
        return fail(FailureKind.TIMEOUT, time_limit_message(settings))
    except Exception as error:
        logger.exception("job %s failed", job_id)
        store.add_event(job_id, traceback.format_exc(), kind="error")
        return fail(FailureKind.INFRASTRUCTURE, f"{type(error).__name__}: {error}")


def _register(
    store: JobStore,
    job_id: str,
    worker_id: str,
    result: Result,
    publish: Callable[[Result], dict[str, Any]] | None = None,
) -> str:
    """Records where the outputs are and the summary metrics, then marks the job succeeded.

    ``publish`` (the MLflow registration) runs in REGISTERING; what it returns joins the
    job's outputs.
    """
    if not store.transition(job_id, JobState.REGISTERING, worker_id=worker_id):
        return "lease_lost"
    if publish is not None:
        store.record_outputs(job_id, publish(result))
    outputs = _outputs(result)
    store.record_outputs(job_id, outputs)
    metrics = outputs["metrics"]
    store.transition(
        job_id,
        JobState.SUCCEEDED,
        worker_id=worker_id,
        message=f"succeeded: {format_metrics(metrics)}",
    )
    return JobState.SUCCEEDED.value


def _outputs(result: Result) -> dict[str, Any]:
    """Files and metrics for the job record; a comparison adds its table (``comparison``) and
    reports the table's flat metrics (``fitnet_miou_mean`` ...)."""
    from maskd_core.runner import JobResult, comparison_metrics

    files: dict[str, Path | None]
    if isinstance(result, JobResult):
        files = {
            "student": result.student_path,
            "tokens": result.tokens_path,
            "summary": result.summary_path,
        }
        extra: dict[str, Any] = {}
        metrics = result.metrics
    else:
        files = {
            "comparison": result.table_path,
            "comparison_markdown": result.markdown_path,
            "tokens": result.tokens_path,
        }
        extra = {"comparison": result.table}
        metrics = comparison_metrics(result.table)
    return {
        "files": {name: str(path) for name, path in files.items() if path is not None},
        "metrics": {name: float(value) for name, value in metrics.items()},
        **extra,
    }


@contextmanager
def _tracked(
    store: JobStore,
    settings: Settings,
    job_id: str,
    project_id: str,
    spec: JobSpec,
    workdir: Path,
) -> Iterator[tuple[MlflowTracker, JobSpec]]:
    """MLflow around one run: registry weights resolved, stage 1 reused if it can be, and the
    tracker whose runs end as the job ends.

    Yields the tracker and the spec to run (``models:/`` weights replaced by cached files).
    """
    from service.model_uris import resolve_registry_weights
    from workers.tracking import MlflowTracker, experiment_name, reuse_stage1_tokens

    project = store.get_project(project_id)
    if project is None:
        raise RuntimeError(f"job {job_id} belongs to unknown project {project_id}")
    uri = settings.mlflow_tracking_uri
    resolved = resolve_registry_weights(spec, project.name, uri, settings.data_dir / "model-cache")
    reused = reuse_stage1_tokens(uri, project.name, resolved, workdir)
    with MlflowTracker(
        uri,
        experiment=experiment_name(project.name),
        job_id=job_id,
        project=project.name,
        spec=resolved,
        source_spec=spec,
        workdir=workdir,
        artifact_root=settings.data_dir / "mlartifacts",
    ) as tracker:
        if reused is not None:
            tracker.mark_stage1_reused(reused)
            store.add_event(job_id, f"stage 1 reused from job {reused.job_id}")
        yield tracker, resolved


def _publisher(settings: Settings, tracker: MlflowTracker) -> Callable[[Result], dict[str, Any]]:
    """Registers the student(s) on the job's MLflow runs; returns the links for the outputs.

    A comparison registers every (method, seed) student as a version of the job's one
    registered model, logged on its own nested run and told apart by the version tags
    ``maskd.method`` and ``maskd.seed``; no alias moves (see ``log_and_register_student``).
    """
    from maskd_core.runner import JobResult, comparison_metrics
    from workers.tracking import log_and_register_student

    def publish(result: Result) -> dict[str, Any]:
        links: dict[str, Any] = {
            "mlflow": {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id}
        }
        if isinstance(result, JobResult):
            version = log_and_register_student(
                settings.mlflow_tracking_uri,
                tracker.run_id,
                tracker.project,
                tracker.spec,
                result.workdir,
                result.metrics,
            )
            links["model"] = {"name": version.name, "version": version.version, "uri": version.uri}
            return links
        models = []
        for run in result.runs:
            version = log_and_register_student(
                settings.mlflow_tracking_uri,
                tracker.run_id,
                tracker.project,
                tracker.spec.run_spec(run.method, run.seed),
                run.workdir,
                run.metrics,
                model_run_id=tracker.stage_run(run.stage),
                alias=None,
            )
            models.append(
                {
                    "method": run.method.name,
                    "seed": run.seed,
                    "name": version.name,
                    "version": version.version,
                    "uri": version.uri,
                }
            )
        tracker.log_comparison(comparison_metrics(result.table))
        links["models"] = models
        return links

    return publish
