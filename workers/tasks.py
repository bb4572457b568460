"""``maskd.run_job``: run one MasKD job under a database lease, at most once at a time.

Celery delivers at least once (a late-acked message comes back after a crash or a visibility
timeout, the reconciler re-sends lost ones), so the task makes each delivery safe on its own:
it runs only after winning a compare-and-set claim on the job row, keeps the claim alive with a
heartbeat, resumes from the checkpoints in the job's work directory, and records how the
attempt ended (``workers.outcomes``). A delivery that loses the claim does nothing; one whose
job plainly cannot be claimed is dropped earlier, in the worker's parent, without using a pool
process (``workers.delivery_gate``).

torch, the core runner and MLflow are imported inside ``_run_claimed``, i.e. in the prefork
child that runs the job, never in the worker's parent; so is ``workers.metrics`` (see there).
Each child has imported them already when it started (``workers.observability.JOB_MODULES``),
so these imports cost nothing by the time a job arrives. The child runs job after job
(``service.dispatch.celery_config``), so what a job leaves behind is released when it ends
(``_release_memory_between_jobs``). Every log line of an attempt carries the job id, the
attempt and the stage (``service.logs.job_log_context``).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import time
import uuid
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Task

from service.config import Settings, get_settings
from service.db import make_engine, make_sessionmaker
from service.lifecycle import FailureKind, JobState, can_transition
from service.logs import job_log_context, set_job_stage
from service.store import JobRecord, JobStore
from workers.app import app
from workers.gpu_slots import SlotWaitStopped, gpu_slots, gpus_needed
from workers.lease import LeaseKeeper
from workers.observability import apply_torch_threads
from workers.outcomes import (
    MAX_ATTEMPTS,
    AttemptEnd,
    attempts_exhausted_message,
)
from workers.reporting import StoreReporter, success_message

if TYPE_CHECKING:
    from maskd_core.callbacks import Callback, Stage
    from maskd_core.runner import JobResult, TeacherResult
    from maskd_core.spec import JobSpec

logger = logging.getLogger(__name__)

SKIPPED = "skipped"


def new_worker_id() -> str:
    """Unique per delivery, so two deliveries in one process can never share a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


# Celery ships no type hints, so its decorator is untyped to mypy.
@app.task(  # type: ignore[untyped-decorator]
    name="maskd.run_job",
    bind=True,
    acks_late=True,
    Request="workers.delivery_gate:JobDeliveryRequest",
)
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
    # In the child, like torch: see workers.metrics.
    from workers import metrics

    with job_log_context(job_id) as log_context:
        worker_id = new_worker_id()
        record = store.claim(job_id, worker_id, settings.lease_seconds)
        if record is None:
            logger.info(
                "job %s: not claimed by delivery %s (finished, cancelled or leased elsewhere)",
                job_id,
                delivery,
            )
            metrics.DELIVERIES_SKIPPED.inc()
            return SKIPPED
        claimed_at = time.monotonic()
        log_context.attempt = record.attempt
        log_context.stage = record.stage
        logger.info("job %s: claimed by %s (attempt %s)", job_id, worker_id, record.attempt)
        metrics.JOBS_STARTED.inc()
        outcome = "error"
        try:
            outcome = _attempt(store, settings, record, worker_id, claimed_at)
            return outcome
        finally:
            metrics.JOBS_FINISHED.labels(outcome.lower()).inc()
            _release_memory_between_jobs()


def _train(
    spec: JobSpec,
    workdir: Path,
    callbacks: list[Callback],
    devices: list[int] | None,
    settings: Settings,
) -> tuple[JobResult | TeacherResult, Stage, int]:
    """The job's training on its processes: one, or rank 0 of several with the others
    started beside it (``maskd_core.distributed``); the callbacks stay in this process.
    Returns the result and the stage and step training ended at. In the child: imports torch.
    """
    from maskd_core.callbacks import STAGE2, TEACHER
    from maskd_core.distributed import run_in_processes
    from maskd_core.runner import run_job, run_teacher_job, teacher_recipe

    timeout = settings.distributed_timeout_seconds
    if spec.kind == "teacher":
        # A teacher job trains its teacher in STAGE2, the training state (it has no stage 1).
        trained = run_in_processes(
            run_teacher_job, spec, workdir, callbacks, devices=devices, timeout_seconds=timeout
        )
        return trained, TEACHER, teacher_recipe(spec).iterations
    result = run_in_processes(
        run_job, spec, workdir, callbacks, devices=devices, timeout_seconds=timeout
    )
    return result, STAGE2, spec.stage2.iterations


def _release_memory_between_jobs() -> None:
    """Hands the GPU memory the job's tensors held back to the driver once the job is over.

    The child stays for the next job, and torch's caching allocator would otherwise keep the
    finished job's blocks reserved: invisible to the next job's peak, but not to anything else
    on the GPU, nor to an operator reading ``nvidia-smi`` on an idle worker. Objects in
    reference cycles (modules with hooks, say) are collected first, or their blocks would stay
    in use. Without CUDA in use there is nothing to hand back, and nothing is done.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    gc.collect()
    torch.cuda.empty_cache()


def _attempt(
    store: JobStore, settings: Settings, record: JobRecord, worker_id: str, claimed_at: float
) -> str:
    """One claimed attempt, from the attempt limit to the lease's release."""
    job_id = record.id
    end = AttemptEnd(store, settings, job_id, worker_id)
    if record.attempt > MAX_ATTEMPTS:
        return end.fail(FailureKind.INFRASTRUCTURE, attempts_exhausted_message(record.attempt))
    lease = LeaseKeeper(
        store,
        job_id,
        worker_id,
        lease_seconds=settings.lease_seconds,
        interval_seconds=settings.heartbeat_seconds,
        poll_seconds=settings.cancel_poll_seconds,
        time_limit_seconds=settings.job_soft_time_limit_seconds,
    )
    try:
        with lease:
            try:
                return _run_claimed(store, settings, record, worker_id, lease, claimed_at)
            except Exception as error:
                return end.after(error, lease.stop_reason)
    finally:
        store.release_lease(job_id, worker_id)
        _end_runs_of_ended_job(store, settings, job_id)


def _end_runs_of_ended_job(store: JobStore, settings: Settings, job_id: str) -> None:
    """Once a failure is recorded (the time limit, exhausted attempts), the job's MLflow runs
    end too, rather than at the reconciler's next pass. In the child: it imports MLflow."""
    from workers.run_closer import close_runs_of_job

    close_runs_of_job(store, settings.mlflow_tracking_uri, job_id)


def _run_claimed(
    store: JobStore,
    settings: Settings,
    record: JobRecord,
    worker_id: str,
    lease: LeaseKeeper,
    claimed_at: float,
) -> str:
    """Runs the job from where its work directory says it stopped, then registers it.

    ``claimed_at`` (``time.monotonic``) is when the claim was won, for ``FirstStepLatency``.
    """
    # Imported here, in the child process: see the module docstring.
    from maskd_core.errors import JobCancelled
    from maskd_core.runner import JobResult, TeacherResult, first_stage
    from workers.metrics import FirstStepLatency, StepMetrics
    from workers.publishing import publish, publish_teacher
    from workers.tracking import tracked_attempt

    apply_torch_threads()
    job_id, state = record.id, record.state
    workdir = settings.job_workdir(job_id).create()
    start = JobState(first_stage(record.spec, workdir).upper())
    if state != start and can_transition(state, start):
        if not store.transition(job_id, start, worker_id=worker_id):
            logger.warning("job %s: could not start %s, leaving it", job_id, start)
            return SKIPPED
        state = start
    set_job_stage(state.value.lower())
    reporter = StoreReporter(store, job_id, worker_id, lease, state=state)
    with tracked_attempt(store, settings, job_id, record.project_id, record.spec, workdir) as (
        tracker,
        resolved,
    ):
        callbacks = [reporter, tracker, StepMetrics(), FirstStepLatency(job_id, claimed_at)]
        # The job's GPUs, host-wide, until it is published (its latency is measured on them).
        try:
            with gpu_slots(
                settings,
                gpus_needed(resolved, settings),
                on_wait=partial(store.add_event, job_id),
                should_stop=lease.should_stop,
            ) as devices:
                result, last_stage, last_step = _train(
                    resolved, workdir.root, callbacks, devices, settings
                )
                if not store.transition(job_id, JobState.REGISTERING, worker_id=worker_id):
                    # Cancelled (or taken over) after the last step: a stop at the end of
                    # training, which ends the job CANCELLED now rather than when the
                    # reconciler finds it.
                    raise JobCancelled(str(last_stage), last_step)
                set_job_stage("registering")
                uri = settings.mlflow_tracking_uri
                if isinstance(result, TeacherResult):
                    links = publish_teacher(result, tracker, uri)
                else:
                    links = publish(result, tracker, uri)
        except SlotWaitStopped as stopped:
            raise JobCancelled("the wait for GPUs", 0) from stopped
        store.record_outputs(job_id, links)
    outputs: dict[str, Any] = {
        "files": {name: str(path) for name, path in result.files.items()},
        "metrics": {name: float(value) for name, value in result.metrics.items()},
    }
    failed: list[dict[str, Any]] = []
    students = 1
    if isinstance(result, JobResult):
        if result.comparison is not None:
            outputs["comparison"] = result.comparison
        failed, students = result.failed, len(result.runs)
    store.record_outputs(job_id, outputs)
    store.transition(
        job_id,
        JobState.SUCCEEDED,
        worker_id=worker_id,
        message=success_message(outputs["metrics"], failed, students),
    )
    return JobState.SUCCEEDED.value
