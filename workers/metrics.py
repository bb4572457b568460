"""Prometheus metrics of the jobs a worker runs, counted in its prefork children.

Imported by the task, in the child, never by the worker's parent: prometheus-client chooses
between in-memory and multiprocess values when it is first imported, and the parent sets
``PROMETHEUS_MULTIPROC_DIR`` (``workers.observability``) only when it starts its endpoint.

In multiprocess mode each child writes its values to files named after its *pool slot*
(``counter_slot0.db``), not its pid. A child runs job after job, and when it is replaced (its
memory limit, a crash, a hard time limit) only once it has exited, so its replacement takes
over the slot's files and counts on from their values: the folder keeps concurrency × 2 files
however many children came and went, where pid-named files would add two per child for the
parent to read at every scrape. Outside a pool (tests calling the task in-process) values stay
in memory.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from celery.utils.log import current_process_index
from prometheus_client import Counter, Histogram, values

from maskd_core.callbacks import Callback, Stage
from maskd_core.spec import JobSpec

logger = logging.getLogger(__name__)


def _pool_slot() -> str:
    """Distinct among the processes alive at once: the pool index in a child, else the pid."""
    index = current_process_index(base=0)
    return f"slot{index}" if index is not None else str(os.getpid())


if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # prometheus-client ships this factory untyped.
    values.ValueClass = values.MultiProcessValue(  # type: ignore[no-untyped-call]
        process_identifier=_pool_slot
    )

FIRST_STEP_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

JOBS_STARTED = Counter(
    "maskd_worker_jobs_started",
    "Job attempts this worker started (deliveries that won the job's lease).",
)
JOBS_FINISHED = Counter(
    "maskd_worker_jobs_finished",
    "Job attempts this worker ended, by the state it left the job in: succeeded, failed, "
    "cancelled, lease_lost (another worker owns the job now), skipped (its first transition "
    "was refused) or error (the task itself crashed).",
    ["outcome"],
)
DELIVERIES_SKIPPED = Counter(
    "maskd_worker_deliveries_skipped",
    "Deliveries that found their job finished, cancelled or leased by another worker.",
)
TRAINING_STEPS = Counter(
    "maskd_worker_training_steps",
    "Optimiser steps taken, by stage kind (stage1, stage2, ...).",
    ["stage"],
)
STEP_SECONDS = Histogram(
    "maskd_worker_step_seconds",
    "Wall time of one training step as the loop sees it (forward, backward, optimiser and "
    "reporting), by stage kind; evaluations and checkpoints are left out.",
    ["stage"],
    buckets=STEP_BUCKETS,
)

CLAIM_TO_FIRST_STEP_SECONDS = Histogram(
    "maskd_worker_claim_to_first_step_seconds",
    "From winning a job's lease to the end of the attempt's first training step: the MLflow "
    "runs, the data and models, the teacher's evaluation (read back when the attempt resumes) "
    "and the step itself.",
    buckets=FIRST_STEP_BUCKETS,
)


class FirstStepLatency(Callback):
    """Times one attempt from its claim (``claimed_at``, on ``clock``) to its first training
    step, into ``CLAIM_TO_FIRST_STEP_SECONDS`` and a log line: how long a job waits for a warm
    worker once it has one, which is what ``bench/worker_start.py`` reports."""

    def __init__(
        self, job_id: str, claimed_at: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._job_id = job_id
        self._claimed_at = claimed_at
        self._clock = clock
        self._seen = False

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        if self._seen:
            return
        self._seen = True
        seconds = self._clock() - self._claimed_at
        CLAIM_TO_FIRST_STEP_SECONDS.observe(seconds)
        logger.info(
            "job %s: first training step (%s, step %d) %.3f s after the claim",
            self._job_id,
            stage,
            step,
            seconds,
        )


class StepMetrics(Callback):
    """Counts steps and times the gap between consecutive steps of a stage.

    The clock restarts after anything between two steps that is not a step (an evaluation, a
    checkpoint, mask images), so those do not land in the step histogram.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: float | None = None

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        self._last = self._clock()

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        now = self._clock()
        TRAINING_STEPS.labels(stage.kind).inc()
        if self._last is not None:
            STEP_SECONDS.labels(stage.kind).observe(now - self._last)
        self._last = now

    def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        self._last = self._clock() if self._last is not None else None

    def on_checkpoint(self, stage: Stage, step: int, path: Path) -> None:
        self._last = self._clock() if self._last is not None else None

    def on_masks(self, stage: Stage, step: int, images: Mapping[str, object]) -> None:
        self._last = self._clock() if self._last is not None else None

    def on_stage_end(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        self._last = None
