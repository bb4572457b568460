"""MLflow for a running job: runs and curves, mask pictures, the registered student, token reuse.

The core reports through ``Callback``; ``MlflowTracker`` turns that into one MLflow parent run
per job with a nested run per stage, so the UI's compare view lines jobs up by their parameters
and final metrics while each stage keeps its own curves. A comparison job gets one nested run
per (method, seed), tagged ``method`` and ``seed``, beside its one stage-1 run, and its table on
the parent (``log_comparison``). Everything talks to MLflow through an
explicit ``MlflowClient(tracking_uri)``: no fluent "active run" state leaks between jobs of one
worker process, and nothing ever falls back to ``./mlruns``.

Also here, because they need the job's MLflow runs: ``log_and_register_student`` (the
REGISTERING step) and the stage-1 token reuse (``stage1_fingerprint``, ``reuse_stage1_tokens``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

# Set before MLflow is imported anywhere in this process: see service/registry.py.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from maskd_core.callbacks import Callback, Stage, parse_stage
from maskd_core.errors import JobCancelled
from maskd_core.spec import JobSpec
from service.registry import (
    CANDIDATE_ALIAS,
    PROJECT_TAG,
    WEIGHTS_FILE,
    WEIGHTS_SHA256_TAG,
    file_sha256,
    registered_model_name,
)

logger = logging.getLogger(__name__)

STAGE_RUNS = ("stage1", "stage2", "baseline")
"""Stages with a nested run of their own; anything else ("teacher", "eval") logs on the parent.
A comparison run's stage ("stage2/mgd/seed1") counts as "stage2" and gets a run of its own."""

PARENT_STAGE = "job"
"""Value of the ``stage`` tag on a job's parent run."""

TOKENS_FILE = "tokens.pt"
TOKENS_ARTIFACT_DIR = "tokens"
FINGERPRINT_TAG = "maskd.tokens_fingerprint"
TOKENS_SHA256_TAG = "maskd.tokens_sha256"
REUSED_FROM_JOB_TAG = "maskd.stage1_reused_from_job"
REUSED_FROM_RUN_TAG = "maskd.stage1_reused_from_run"
FINGERPRINT_FORMAT = "maskd-stage1-fingerprint/1"

STUDENT_MODEL_CODE = Path(__file__).with_name("student_model.py")
"""The "models from code" file MLflow stores with each student (see its docstring)."""

MODEL_SPEC_FILE = "model_spec.json"


def experiment_name(project: str) -> str:
    return f"maskd/{project}"


# --------------------------------------------------------------------------------------------
# Experiments and parameters


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
    """The experiment id; creates it once, tolerating a worker that creates it at the same time."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return str(existing.experiment_id)
    try:
        return str(
            client.create_experiment(
                name, artifact_location=artifact_location, tags={PROJECT_TAG: project}
            )
        )
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
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str,
        job_id: str,
        project: str,
        spec: JobSpec,
        workdir: Path,
        artifact_root: Path,
        source_spec: JobSpec | None = None,
        flush_interval_seconds: float = 10.0,
        max_points_per_curve: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``spec`` is what runs (local weight paths); ``source_spec`` what the user submitted
        (``models:/`` URIs), logged as the parameters when given."""
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.job_id = job_id
        self.project = project
        self.spec = spec
        self.workdir = workdir
        self.fingerprint = stage1_fingerprint(spec)
        self._flush_interval = flush_interval_seconds
        self._max_points = max_points_per_curve
        self._clock = clock
        self._last_flush = clock()
        self._pending: list[tuple[str, Metric]] = []
        self._every: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        self._stage_runs: dict[str, str] = {}
        """Stage → its run, kept after the stage ends: the core reports the stage's masks,
        tokens and masked-teacher evaluation after ``on_stage_end``."""
        self._running: set[str] = set()
        self.experiment_id = get_or_create_experiment(
            self.client,
            experiment,
            artifact_location_for(tracking_uri, artifact_root, experiment),
            project,
        )
        self.run_id = self._open_run(PARENT_STAGE, source_spec or spec, parent=None)

    # -- runs ---------------------------------------------------------------------------------

    def _tags(self, stage: str) -> dict[str, str]:
        """A comparison's parent is tagged with every method it runs, each run with its own."""
        _, method, seed = parse_stage(stage)
        tags = {
            "job_id": self.job_id,
            "project": self.project,
            PROJECT_TAG: self.project,
            "teacher": self.spec.teacher.arch,
            "student": self.spec.student.arch,
            "method": method or ",".join(m.name for m in self.spec.methods()),
            "task": self.spec.task,
            "stage": stage,
        }
        if seed is not None:
            tags["seed"] = str(seed)
        return tags

    def _find_run(self, stage: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.job_id = '{_quote(self.job_id)}' and tags.stage = '{stage}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return str(runs[0].info.run_id) if runs else None

    def _open_run(self, stage: str, params_spec: JobSpec, parent: str | None) -> str:
        found = self._find_run(stage)
        if found is not None:
            self.client.update_run(found, status="RUNNING")
            return found
        tags = self._tags(stage)
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        else:
            tags[FINGERPRINT_TAG] = self.fingerprint
        run_name = f"{self.spec.name}-{stage}" if parent else self.spec.name
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        run_id = str(run.info.run_id)
        params = flatten_spec(params_spec)
        if parent is not None:
            kind = parse_stage(stage)[0]
            params = {k: v for k, v in params.items() if k.startswith(f"{kind}.")}
        for chunk in _chunks(list(params.items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in chunk])
        return run_id

    def _run_for(self, stage: Stage) -> str:
        return self._stage_runs.get(stage, self.run_id)

    def stage_run(self, stage: Stage) -> str | None:
        """The nested run of ``stage``, also one an earlier delivery of the job opened."""
        return self._stage_runs.get(stage) or self._find_run(stage)

    # -- callbacks ----------------------------------------------------------------------------

    @_best_effort
    def on_stage_start(self, stage: Stage, start_step: int, total_steps: int) -> None:
        self._totals[stage] = total_steps
        self._every[stage] = max(1, math.ceil(total_steps / self._max_points))
        if parse_stage(stage)[0] in STAGE_RUNS:
            run_id = self._open_run(stage, self.spec, parent=self.run_id)
            self._stage_runs[stage] = run_id
            self._running.add(run_id)

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
        """Files go on their stage's run; the student's weights travel in the model instead."""
        if path.name == WEIGHTS_FILE or not path.is_file():
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
            self._running.discard(run_id)
            self.client.set_terminated(run_id, status="FINISHED")

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

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Ends the runs as the job ended: FINISHED, KILLED (cancelled) or FAILED."""
        if exc is None:
            status = "FINISHED"
        else:
            status = "KILLED" if isinstance(exc, JobCancelled) else "FAILED"
        try:
            self.finish(status)
        except Exception:
            if exc is None:
                raise
            logger.warning("job %s: could not end its MLflow runs", self.job_id, exc_info=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Ends the job's runs: FINISHED, FAILED or KILLED (cancelled). Safe to call twice."""
        self.flush()
        for run_id in self._running:
            self.client.set_terminated(run_id, status=status)
        self._running.clear()
        self.client.set_terminated(self.run_id, status=status)

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
        run_id = self._stage_runs.get("stage1")
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


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# --------------------------------------------------------------------------------------------
# Stage-1 reuse


def stage1_fingerprint(spec: JobSpec) -> str:
    """SHA-256 over everything stage 1's result depends on, so equal fingerprints mean
    interchangeable tokens.

    In: the task, the teacher (arch, args, tapped layers and the SHA-256 of its weights file,
    not its path), every stage-1 setting but ``reuse``, the dataset spec, the batch size and
    mixed precision (they change the optimisation), and the seed: it fixes the token
    initialisation and the batch order, so a different seed is a different stage 1, and a user
    who changes it on purpose (to measure variance) must get a fresh one.

    Out: the student and stage 2 (stage 1 never sees them, which is the point of reuse),
    ``device`` and ``num_workers`` (the batches are step-indexed and identical on any device up
    to floating-point noise), evaluation and checkpoint cadence.

    ``spec`` must have local weight paths (after ``resolve_registry_weights``).
    """
    teacher = spec.teacher
    payload = {
        "format": FINGERPRINT_FORMAT,
        "task": spec.task,
        "teacher": {
            "arch": teacher.arch,
            "args": teacher.args,
            "layers": teacher.layers,
            "weights_sha256": file_sha256(Path(teacher.weights)) if teacher.weights else None,
        },
        "stage1": spec.stage1.model_dump(mode="json", exclude={"reuse"}),
        "dataset": spec.dataset.model_dump(mode="json"),
        "seed": spec.seed,
        "batch_size": spec.batch_size,
        "mixed_precision": spec.mixed_precision,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ReusedTokens:
    """Where reused tokens came from: the job, its stage-1 run, and the fingerprint matched."""

    job_id: str
    run_id: str
    fingerprint: str


def reuse_stage1_tokens(
    tracking_uri: str, project: str, spec: JobSpec, workdir: Path
) -> ReusedTokens | None:
    """Puts the tokens of an earlier matching stage 1 at ``workdir/tokens.pt``, or returns None.

    Only finished stage-1 runs of the same project count (the project's experiment, and the
    run's project tag as a second check). Nothing happens when ``stage1.reuse`` is false or the
    job already has tokens (a resumed job keeps its own). The file is verified against the
    SHA-256 recorded with it and moved into place atomically, so the core either sees a whole
    artifact or none and then runs stage 1 itself.
    """
    from maskd_core.methods import job_needs_tokens

    target = workdir / TOKENS_FILE
    if not job_needs_tokens(spec) or not spec.stage1.reuse or target.exists():
        return None
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(project))
    if experiment is None:
        return None
    fingerprint = stage1_fingerprint(spec)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and tags.`{PROJECT_TAG}` = "
            f"'{_quote(project)}' and tags.stage = 'stage1' and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".tokens-") as tmp:
        downloaded = Path(
            client.download_artifacts(
                run.info.run_id, f"{TOKENS_ARTIFACT_DIR}/{TOKENS_FILE}", dst_path=tmp
            )
        )
        expected = run.data.tags.get(TOKENS_SHA256_TAG)
        if expected is not None and file_sha256(downloaded) != expected:
            logger.warning("tokens of run %s fail their checksum; relearning", run.info.run_id)
            return None
        os.replace(downloaded, target)
    return ReusedTokens(
        job_id=run.data.tags.get("job_id", "?"), run_id=run.info.run_id, fingerprint=fingerprint
    )


# --------------------------------------------------------------------------------------------
# The student in the Model Registry


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    uri: str
    """``models:/NAME/VERSION``: usable as a later job's ``teacher.weights``."""


def student_pip_requirements() -> list[str]:
    """Pinned explicitly: inferring them costs about 5 s and a subprocess per model.

    ``maskd`` is listed because the model code imports ``maskd_core``; deployments install it
    from our own index (it is not on public PyPI).
    """
    import pydantic
    import torch

    import maskd_core

    return [
        f"maskd=={maskd_core.__version__}",
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pydantic=={pydantic.VERSION}",
    ]


def _student_io(spec: JobSpec) -> tuple[int, np.ndarray | None]:
    """The class count and, for segmentation, two real validation-size images as the example.

    Two, not one: an example of batch 1 is easily read as "the batch size is 1". Detection
    samples are not a plain image tensor, so those students get no example (and no output
    schema): their pyfunc contract is not defined yet.
    """
    from maskd_core.data import DATASETS

    args = DATASETS.parse_args(spec.dataset.name, spec.dataset.args, field="dataset.args")
    dataset = DATASETS.get(spec.dataset.name, field="dataset.name")(args, spec.seed)
    if spec.task != "segmentation":
        return int(dataset.num_classes), None
    images = [dataset[index][0].numpy() for index in range(min(2, len(dataset)))]
    return int(dataset.num_classes), np.stack(images).astype(np.float32)


def log_and_register_student(
    tracking_uri: str,
    run_id: str,
    project: str,
    spec: JobSpec,
    workdir: Path,
    metrics: Mapping[str, float],
    *,
    model_run_id: str | None = None,
    alias: str | None = CANDIDATE_ALIAS,
) -> RegisteredVersion:
    """Logs ``workdir/student.pt`` as a pyfunc model on the job's run, registers a version
    with lineage tags and points ``alias`` (``candidate``) at it.

    ``spec`` is the resolved spec (local paths) of this student, whose method and seed the
    version's tags record; the weights source the user wrote is read back from the job's run
    (``run_id``) ``teacher.weights`` parameter. A comparison logs each student on its own
    nested run (``model_run_id``) and moves no alias: which method wins is for the user to read
    from the table, not for the last run to decide.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # pyfunc.log_model resolves the store from the process-wide URI; set it explicitly so it
    # can never be a default.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    run = client.get_run(run_id)
    weights = workdir / WEIGHTS_FILE
    num_classes, example = _student_io(spec)
    model_spec = workdir / MODEL_SPEC_FILE
    model_spec.write_text(
        json.dumps(
            {
                "format": "maskd-model-spec/1",
                "model": spec.student.model_dump(mode="json", exclude={"weights"}),
                "num_classes": num_classes,
                "task": spec.task,
            },
            indent=2,
        )
    )
    model_run_id = model_run_id or run_id
    logged = client.create_logged_model(
        run.info.experiment_id,
        name="student",
        source_run_id=model_run_id,
        model_type="maskd-student",
    )
    # Batch, height and width are free: the networks are fully convolutional.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=(
            Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1))])
            if spec.task == "segmentation"
            else None
        ),
    )
    info = mlflow.pyfunc.log_model(
        name="student",
        python_model=str(STUDENT_MODEL_CODE),
        artifacts={"weights": str(weights), "model_spec": str(model_spec)},
        pip_requirements=student_pip_requirements(),
        signature=signature,
        input_example=example,
        model_id=logged.model_id,
    )
    client.log_outputs(model_run_id, [LoggedModelOutput(logged.model_id, step=0)])

    name = registered_model_name(project, spec.name)
    _get_or_create_registered_model(client, name, project)
    teacher_weights = spec.teacher.weights
    lineage = {
        "maskd.job_id": str(run.data.tags.get("job_id", "")),
        PROJECT_TAG: project,
        "maskd.method": spec.stage2.method.name,
        "maskd.seed": str(spec.seed),
        "maskd.task": spec.task,
        "maskd.arch": spec.student.arch,
        "maskd.teacher.arch": spec.teacher.arch,
        "maskd.teacher.weights": run.data.params.get("teacher.weights", str(teacher_weights)),
        "maskd.teacher.weights_sha256": (
            file_sha256(Path(teacher_weights)) if teacher_weights else "none"
        ),
        FINGERPRINT_TAG: stage1_fingerprint(spec),
        WEIGHTS_SHA256_TAG: file_sha256(weights),
        **{f"maskd.metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }
    reused = run.data.tags.get(REUSED_FROM_JOB_TAG)
    if reused:
        lineage[REUSED_FROM_JOB_TAG] = reused
    version = client.create_model_version(
        name, source=info.model_uri, run_id=model_run_id, tags=lineage, model_id=logged.model_id
    )
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion(
        name=name, version=str(version.version), uri=f"models:/{name}/{version.version}"
    )


def _get_or_create_registered_model(client: MlflowClient, name: str, project: str) -> None:
    """Creates the model with its project tag, or checks an existing one is this project's.

    The check matters: names are registry-wide, and adding a version to a model another
    project owns would put our weights in their registry.
    """
    try:
        client.create_registered_model(
            name,
            tags={PROJECT_TAG: project},
            description=f"MasKD students distilled by project {project}.",
        )
        return
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    owner = client.get_registered_model(name).tags.get(PROJECT_TAG)
    if owner != project:
        raise RuntimeError(f"registered model {name!r} belongs to another project")
