"""MLflow for a running job: one parent run, a nested run per stage, curves, masks, tokens.

The core reports through ``Callback``; ``MlflowTracker`` turns that into one MLflow parent run
per job with a nested run per stage, so the UI's compare view lines jobs up by their parameters
and final metrics while each stage keeps its own curves. A comparison job gets one nested run
per (method, seed), tagged with its method and seed and given that run's own parameters, beside
its one stage-1 run, and its table on the parent (``log_comparison``); a run that fails on its
own ends FAILED as it fails (``on_run_failed``) while the job goes on. Everything talks to
MLflow through an explicit ``MlflowClient(tracking_uri)``: no fluent "active run" state leaks
between jobs of one worker process, and nothing ever falls back to ``./mlruns``. Every tag and
artifact name comes from ``service.mlflow_names``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from maskd_core.callbacks import STAGE1, Callback, Stage
from maskd_core.files import file_sha256
from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec
from maskd_core.workdir import STUDENT_FILE, TEACHER_FILE, TOKENS_FILE
from service.mlflow_names import (
    EXPERIMENT_KIND_TAG,
    FAILURE_TAG,
    FINGERPRINT_TAG,
    JOB_ID_TAG,
    METHOD_TAG,
    PAIRING_ARTIFACT,
    PAIRING_TAG,
    PARENT_RUN_TAG,
    PARENT_STAGE,
    PROJECT_TAG,
    REUSED_FROM_JOB_TAG,
    REUSED_FROM_RUN_TAG,
    RUN_PROJECT_TAG,
    SEED_TAG,
    STAGE_TAG,
    STUDENT_TAG,
    TASK_TAG,
    TEACHER_TAG,
    TOKENS_ARTIFACT_DIR,
    TOKENS_SHA256_TAG,
    TRAINING_EXPERIMENT_KIND,
    label_tags,
    quoted,
)
from workers.token_reuse import ReusedTokens

logger = logging.getLogger(__name__)

STAGE_RUNS = ("stage1", "stage2", "baseline")
"""Stage kinds with a nested run of their own; the others ("teacher", "eval") log on the
parent. Every comparison run is a stage 2 and gets a run of its own."""


def artifact_location_for(tracking_uri: str, artifact_root: Path, name: str) -> str | None:
    """Where a new experiment keeps its artifacts.

    With a database URI the client writes artifacts itself, so the location must be explicit or
    MLflow picks ``./mlruns`` relative to whatever directory the worker happens to run in. With
    a tracking server (``http``) the server owns the store (``--serve-artifacts``, under the data
    directory, see ``maskd mlflow``); a local path here would be one only the worker can see.
    """
    if tracking_uri.startswith(("http://", "https://")):
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    return (artifact_root.resolve() / slug).as_uri()


def get_or_create_experiment(
    client: MlflowClient, name: str, artifact_location: str | None, project: str
) -> str:
    """The experiment id; creates it once, tolerating a worker that creates it at the same time.

    The experiment is marked a model-training one (``EXPERIMENT_KIND_TAG``), so MLflow's UI
    offers its runs table and charts rather than its GenAI pages; an experiment created before
    maskd set the kind gets it when a job next uses it.
    """
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT_KIND:
            client.set_experiment_tag(
                existing.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND
            )
        return str(existing.experiment_id)
    tags = {PROJECT_TAG: project, EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location, tags=tags))
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        raced = client.get_experiment_by_name(name)
        if raced is None:
            raise
        return str(raced.experiment_id)


def flatten_spec(spec: JobSpec) -> dict[str, str]:
    """The spec as dotted parameters (``stage1.optimizer.lr``); lists stay JSON strings.

    Values are cut to MLflow's length limit: a parameter is for comparing runs, the full spec
    is in the job record.
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[prefix] = text[:MAX_PARAM_VAL_LENGTH]

    walk("", spec.model_dump(mode="json"))
    return flat


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_METRIC_KEY_INVALID = re.compile(r"[^A-Za-z0-9_\-. /]")


def _metric_key(name: str) -> str:
    return _METRIC_KEY_INVALID.sub("_", name)


# --------------------------------------------------------------------------------------------
# The tracker

P = ParamSpec("P")
TrackerT = TypeVar("TrackerT", bound="MlflowTracker")


def _best_effort(
    method: Callable[Concatenate[TrackerT, P], None],
) -> Callable[Concatenate[TrackerT, P], None]:
    """Logs and swallows MLflow failures inside the training loop.

    The client already retries transient HTTP errors; what still fails means the tracking
    server is down for a while, and that must not cost hours of training. The job's state and
    metrics live in SQL regardless, and registration (not best effort) fails the job if MLflow
    is still unreachable at the end.
    """

    @functools.wraps(method)
    def guarded(tracker: TrackerT, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(tracker, *args, **kwargs)
        except Exception:
            logger.warning(
                "job %s: MLflow %s failed; training continues without it",
                tracker.job_id,
                method.__name__,
                exc_info=True,
            )

    return guarded


class MlflowTracker(Callback):
    """Logs one job to MLflow: parent run, a nested run per stage, curves, masks, tokens.

    A redelivered or resumed job finds its runs again by the ``job_id`` tag instead of opening
    new ones, so its curves continue where the checkpoint left off.

    Step metrics are thinned to at most ``max_points_per_curve`` points per stage and sent in
    ``log_batch`` calls at most every ``flush_interval_seconds``: a 40 000-step stage costs a
    few hundred requests, not 160 000.

    While a stage's run is open, MLflow's system-metrics monitor samples the machine (CPU and,
    with ``nvidia-ml-py``, GPU utilisation and memory) into it as ``system/...`` metrics every
    ``system_metrics_interval_seconds`` (None: not sampled), so a slow run shows whether it
    waited on data, CPU or GPU.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str,
        job_id: str,
        project: str,
        spec: JobSpec,
        fingerprint: str,
        artifact_root: Path,
        source_spec: JobSpec | None = None,
        flush_interval_seconds: float = 10.0,
        max_points_per_curve: int = 1000,
        system_metrics_interval_seconds: float | None = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``spec`` is what runs (local weight paths); ``source_spec`` what the user submitted
        (``models:/`` URIs), logged as the parameters when given. ``fingerprint`` is stage 1's
        (``token_reuse.stage1_fingerprint``), tagged on the tokens so later jobs find them."""
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.job_id = job_id
        self.project = project
        self.spec = spec
        self.fingerprint = fingerprint
        self._flush_interval = flush_interval_seconds
        self._max_points = max_points_per_curve
        self._clock = clock
        self._last_flush = clock()
        self._pending: list[tuple[str, Metric]] = []
        self._every: dict[Stage, int] = {}
        self._totals: dict[Stage, int] = {}
        self._stage_runs: dict[Stage, str] = {}
        """Stage → its run, kept after the stage ends: the core reports the stage's masks,
        tokens and masked-teacher evaluation after ``on_stage_end``."""
        self._running: set[str] = set()
        self._tracking_uri = tracking_uri
        self._system_metrics_interval = system_metrics_interval_seconds
        self._monitors: dict[str, SystemMetricsMonitor] = {}
        """Run → the system-metrics monitor sampling into it while it is open."""
        self.experiment_id = get_or_create_experiment(
            self.client,
            experiment,
            artifact_location_for(tracking_uri, artifact_root, experiment),
            project,
        )
        self.run_id = self._open_parent_run(source_spec or spec)

    # -- runs ---------------------------------------------------------------------------------

    def _find_run(self, stage: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{JOB_ID_TAG} = '{quoted(self.job_id)}' and "
            f"tags.{STAGE_TAG} = '{quoted(stage)}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return str(runs[0].info.run_id) if runs else None

    def _open_run(
        self, stage: str, tags: dict[str, str], params: dict[str, str], run_name: str
    ) -> str:
        """The job's run for ``stage``: found again after a redelivery, else created."""
        found = self._find_run(stage)
        if found is not None:
            self.client.update_run(found, status="RUNNING")
            return found
        common = {
            JOB_ID_TAG: self.job_id,
            RUN_PROJECT_TAG: self.project,
            PROJECT_TAG: self.project,
            TEACHER_TAG: self.spec.teacher.arch,
            **({STUDENT_TAG: self.spec.student.arch} if self.spec.student is not None else {}),
            TASK_TAG: self.spec.task,
            STAGE_TAG: stage,
            **label_tags(self.spec.labels),
        }
        run = self.client.create_run(self.experiment_id, tags=common | tags, run_name=run_name)
        run_id = str(run.info.run_id)
        for chunk in _chunks(list(params.items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
        return run_id

    def _open_parent_run(self, spec: JobSpec) -> str:
        """Tagged with every method the job runs (a comparison's, comma-separated)."""
        tags = {
            METHOD_TAG: ",".join(m.name for m in self.spec.methods()),
            FINGERPRINT_TAG: self.fingerprint,
        }
        return self._open_run(PARENT_STAGE, tags, flatten_spec(spec), self.spec.name)

    def _open_stage_run(self, stage: Stage, spec: JobSpec) -> str:
        """A nested run with the stage's own section of its own spec (and its seed), so a
        comparison run's parameters are that run's method, params and seed."""
        methods = [spec.stage2.method] if stage.is_comparison_run else spec.methods()
        tags = {PARENT_RUN_TAG: self.run_id, METHOD_TAG: ",".join(m.name for m in methods)}
        if stage.seed is not None:
            tags[SEED_TAG] = str(stage.seed)
        params = {
            key: value
            for key, value in flatten_spec(spec).items()
            if key.startswith(f"{stage.kind}.") or key == "seed"
        }
        return self._open_run(str(stage), tags, params, f"{self.spec.name}-{stage}")

    def _run_for(self, stage: Stage) -> str:
        return self._stage_runs.get(stage, self.run_id)

    def stage_run(self, stage: Stage) -> str | None:
        """The nested run of ``stage``, also one an earlier delivery of the job opened."""
        return self._stage_runs.get(stage) or self._find_run(str(stage))

    # -- callbacks ----------------------------------------------------------------------------

    @_best_effort
    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        self._totals[stage] = total_steps
        self._every[stage] = max(1, math.ceil(total_steps / self._max_points))
        if stage.kind in STAGE_RUNS:
            run_id = self._open_stage_run(stage, spec)
            self._stage_runs[stage] = run_id
            self._running.add(run_id)
            self._monitor_system(run_id)

    @_best_effort
    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        every = self._every.get(stage, 1)
        if step % every and step != self._totals.get(stage):
            return
        self._queue(stage, step, metrics)
        if (
            len(self._pending) >= MAX_METRICS_PER_BATCH
            or self._clock() - self._last_flush >= self._flush_interval
        ):
            self.flush()

    @_best_effort
    def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        """Evaluations are rare and what users wait for, so they are sent at once."""
        self._queue(stage, step, metrics)
        self.flush()

    @_best_effort
    def on_masks(self, stage: Stage, step: int, images: Mapping[str, np.ndarray]) -> None:
        run_id = self._run_for(stage)
        for name, image in images.items():
            key = _metric_key(f"masks/{name}")
            self.client.log_image(run_id, image, key=key, step=step)

    @_best_effort
    def on_artifact(self, stage: Stage, name: str, path: Path) -> None:
        """Files go on their stage's run; a student's or a teacher job's weights travel in the
        registered model instead."""
        if path.name in (STUDENT_FILE, TEACHER_FILE) or not path.is_file():
            return
        if path.name == TOKENS_FILE:
            self._log_tokens(path)
            return
        self.client.log_artifact(self._run_for(stage), str(path))

    @_best_effort
    def on_stage_end(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        """Ends the stage's run; its last step's metrics were already logged by ``on_step``."""
        self.flush()
        run_id = self._stage_runs.get(stage)
        if run_id is not None and run_id in self._running:
            self._stop_monitor(run_id)
            self._running.discard(run_id)
            self.client.set_terminated(run_id, status="FINISHED")

    @_best_effort
    def on_run_failed(self, stage: Stage, reason: str) -> None:
        """Ends the comparison run's own run FAILED, with the reason as a tag, at once: the job
        goes on and ends its remaining runs FINISHED. A rerun that retries the run reopens it."""
        self.flush()
        run_id = self._stage_runs.get(stage)
        if run_id is None:
            return
        self._stop_monitor(run_id)
        self._running.discard(run_id)
        self.client.set_tag(run_id, FAILURE_TAG, reason[:MAX_TAG_VAL_LENGTH])
        self.client.set_terminated(run_id, status="FAILED")

    # -- helpers the worker calls -------------------------------------------------------------

    def mark_stage1_reused(self, reused: ReusedTokens) -> None:
        """Records on the job's run that stage 1 was not run but taken from an earlier job."""
        self.client.log_batch(
            self.run_id,
            tags=[
                RunTag(REUSED_FROM_JOB_TAG, reused.job_id),
                RunTag(REUSED_FROM_RUN_TAG, reused.run_id),
            ],
        )

    def log_comparison(self, metrics: Mapping[str, float]) -> None:
        """A comparison's table as parent-run metrics (``fitnet_miou_mean`` ...), so the compare
        view lines the methods up; the table files reach the parent through ``on_artifact``."""
        now = int(time.time() * 1000)
        rows = [Metric(_metric_key(k), float(v), now, 0) for k, v in metrics.items()]
        for chunk in _chunks(rows, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def on_plan(self, plan: JobPlan) -> None:
        """What the job distils against what, on its run as soon as the attempt planned it (a
        running or cancelled job shows it too): the one-line tag to filter and read in the runs
        table, and ``pairing.json`` (``JobPlan.pairing``) with every level. A resumed attempt
        writes the same again."""
        self.client.set_tag(self.run_id, PAIRING_TAG, plan.pairing_line()[:MAX_TAG_VAL_LENGTH])
        self.client.log_text(self.run_id, json.dumps(plan.pairing(), indent=2), PAIRING_ARTIFACT)

    def finish(self, status: str = "FINISHED") -> None:
        """Ends the job's runs: FINISHED, FAILED or KILLED (cancelled). Safe to call twice."""
        self.flush()
        for run_id in self._running:
            self._stop_monitor(run_id)
            self.client.set_terminated(run_id, status=status)
        self._running.clear()
        self.client.set_terminated(self.run_id, status=status)

    def leave_open(self) -> None:
        """Sends what is queued and stops sampling the machine, leaving the runs RUNNING for the
        job's next attempt (the worker is going away, not the job)."""
        self.flush()
        for run_id in list(self._monitors):
            self._stop_monitor(run_id)

    def flush(self) -> None:
        """Sends the queued metrics, one ``log_batch`` per run and 1000 metrics."""
        pending, self._pending = self._pending, []
        self._last_flush = self._clock()
        by_run: dict[str, list[Metric]] = {}
        for run_id, metric in pending:
            by_run.setdefault(run_id, []).append(metric)
        for run_id, metrics in by_run.items():
            for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk)

    def _monitor_system(self, run_id: str) -> None:
        """Starts sampling the machine into ``run_id``; a reopened run continues its steps."""
        if self._system_metrics_interval is None or run_id in self._monitors:
            return
        monitor = SystemMetricsMonitor(  # type: ignore[no-untyped-call]
            run_id,
            sampling_interval=self._system_metrics_interval,
            resume_logging=True,
            tracking_uri=self._tracking_uri,
        )
        monitor.start()  # type: ignore[no-untyped-call]
        self._monitors[run_id] = monitor

    def _stop_monitor(self, run_id: str) -> None:
        """Stops sampling into ``run_id`` and sends one last sample, before the run ends.

        The monitor publishes only after a whole interval, so without the closing sample a
        stage shorter than the interval would have no system metrics at all, and every longer
        one would lose its last seconds.
        """
        monitor = self._monitors.pop(run_id, None)
        if monitor is None:
            return
        # MLflow ships the monitor without type hints.
        monitor.finish()  # type: ignore[no-untyped-call]
        monitor.collect_metrics()  # type: ignore[no-untyped-call]
        monitor.publish_metrics(monitor.aggregate_metrics())  # type: ignore[no-untyped-call]
        monitor.mlflow_logger.flush()  # type: ignore[no-untyped-call]

    def _queue(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        run_id = self._run_for(stage)
        now = int(time.time() * 1000)
        for name, value in metrics.items():
            self._pending.append((run_id, Metric(_metric_key(name), float(value), now, step)))

    def _log_tokens(self, path: Path) -> None:
        """Uploads the tokens, then tags the run with the fingerprint that makes it reusable.

        The tag comes last: a run is only ever found for reuse once its artifact is complete.
        Tokens the job did not learn (reused, or from before a resume) have no stage-1 run here.
        """
        run_id = self._stage_runs.get(STAGE1)
        if run_id is None:
            return
        self.client.log_artifact(run_id, str(path), artifact_path=TOKENS_ARTIFACT_DIR)
        self.client.log_batch(
            run_id,
            tags=[
                RunTag(TOKENS_SHA256_TAG, file_sha256(path)),
                RunTag(FINGERPRINT_TAG, self.fingerprint),
            ],
        )
