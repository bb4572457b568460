"""The REGISTERING step: every student of a finished job (or the teacher of a teacher job)
into the MLflow Model Registry.

Each student is logged as a pyfunc model ("models from code": ``workers/student_model.py``,
its state dict and the ``model_spec.json`` the core wrote beside it) and registered as a version
of the job's registered model, ``<project>.<job name>-student``, with lineage tags
(``service.mlflow_names``). A single job's student is logged on the job's run and gets the
``candidate`` alias. A comparison registers every (method, seed) student as a version of the
same model, each logged on its own nested run and told apart by the method and seed tags; no
alias moves, since which method wins is for the user to read from the table, not for the last
run to decide.

A job that learned its stage 1 also registers the tokens (and the mask weighting branch, which
lives in the same file) as a version of ``<project>.<teacher arch>-tokens``, logged from the
stage-1 run with its mask images and lineage tags (teacher weights, stage-1 and data
fingerprints), so a later job can name them (``stage1.from_model``) and a person can browse them.
The newest such version carries the ``candidate`` alias.

A teacher job (``kind: teacher``) registers its teacher as a version of
``<project>.<teacher arch>-teacher`` (``register_teacher``), logged like a student (the same
"models from code" file rebuilds any network from its document and weights), with lineage tags
(job, task, seed, arch, the weights it started from, data fingerprint, checksum) and its metrics
as model metrics; the newest carries ``candidate``, so a distillation job names it as
``models:/<project>.<arch>-teacher@candidate``.

A student's evaluation metrics are metrics of its logged model (MLflow 3 links them to the
model version), not tags; its lineage stays in tags. Its pyfunc carries its own code and
requirements (``maskd_core``'s source through ``code_paths``, pinned torch and torchvision), so it
loads where maskd is not installed.

Registration happens exactly once per (job, method, seed) student and once per job's tokens,
across crashes: a worker killed after registering leaves the job in REGISTERING, and the retry
finds the version (and the logged model) the dead attempt made instead of making another.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from maskd_core.callbacks import STAGE1
from maskd_core.files import file_sha256
from maskd_core.spec import JobSpec
from service.mlflow_names import (
    CANDIDATE_ALIAS,
    DATA_FINGERPRINT_TAG,
    FINGERPRINT_TAG,
    JOB_ID_TAG,
    MODEL_EXPORT_ARTIFACT_DIR,
    MODEL_KIND_TAG,
    MODEL_MASKS_ARTIFACT_DIR,
    MODEL_TOKENS_ARTIFACT,
    PROJECT_TAG,
    REUSED_FROM_JOB_TAG,
    STUDENT_KIND,
    STUDENT_MODEL_NAME,
    STUDENT_MODEL_TYPE,
    TEACHER_KIND,
    TEACHER_MODEL_NAME,
    TEACHER_MODEL_TYPE,
    TOKENS_COUNT_TAG,
    TOKENS_FROM_MODEL_TAG,
    TOKENS_JOB_ID_TAG,
    TOKENS_KIND,
    TOKENS_MASK_WEIGHTING_TAG,
    TOKENS_MODEL_NAME,
    TOKENS_MODEL_TYPE,
    TOKENS_SHA256_TAG,
    TOKENS_TEACHER_LAYERS_TAG,
    VERSION_ARCH_TAG,
    VERSION_JOB_ID_TAG,
    VERSION_METHOD_TAG,
    VERSION_SEED_TAG,
    VERSION_TASK_TAG,
    VERSION_TEACHER_ARCH_TAG,
    VERSION_TEACHER_SHA256_TAG,
    VERSION_TEACHER_WEIGHTS_TAG,
    WEIGHTS_SHA256_TAG,
    export_parity_metric,
    export_parity_tag,
    export_sha256_tag,
    export_status_tag,
    latency_metric,
    latency_tag,
    quoted,
    registered_model_name,
    speedup_metric,
    speedup_tag,
    teacher_model_name,
    tokens_model_name,
)
from service.model_registry import use_process_tracking_uri
from workers.token_reuse import data_fingerprint, stage1_fingerprint

if TYPE_CHECKING:
    from maskd_core.runner import JobResult, StudentRun, TeacherResult
    from workers.mlflow_tracker import MlflowTracker

STUDENT_MODEL_CODE = "student_model.py"
"""The "models from code" file of this package that MLflow stores with each student."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    uri: str
    """``models:/NAME/VERSION``: usable as a later job's ``teacher.weights``."""

    @classmethod
    def of(cls, name: str, version: ModelVersion) -> RegisteredVersion:
        return cls(name=name, version=str(version.version), uri=f"models:/{name}/{version.version}")

    def link(self) -> dict[str, str]:
        """As the job's outputs hold it."""
        return {"name": self.name, "version": self.version, "uri": self.uri}


def publish(result: JobResult, tracker: MlflowTracker, tracking_uri: str) -> dict[str, Any]:
    """Registers the job's student(s) on its MLflow runs; returns the links for its outputs."""
    links: dict[str, Any] = {
        "mlflow": {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id}
    }
    comparison = result.comparison is not None
    from maskd_core.export import export_student  # torch: in the task's child, not parent

    models = []
    for run in result.runs:
        export = export_student(run.spec, run.workdir)
        version = register_student(
            tracking_uri,
            tracker.run_id,
            tracker.project,
            run,
            result.plan.num_classes,
            result.input_example,
            model_run_id=tracker.stage_run(run.stage) if comparison else None,
            alias=None if comparison else CANDIDATE_ALIAS,
            export=export,
        )
        models.append(version.link())
    tokens = register_tokens(tracking_uri, tracker, result.tokens_path)
    if tokens is not None:
        links["tokens"] = tokens.link()
    if comparison:
        tracker.log_comparison(result.metrics)
        links["models"] = [
            {"method": run.method.name, "seed": run.seed, **model}
            for run, model in zip(result.runs, models, strict=True)
        ]
    else:
        links["model"] = models[0]
    return links


TEACHER_IDENTITY_TAGS = (VERSION_JOB_ID_TAG,)
"""A teacher job trains one teacher: one version per job."""


def publish_teacher(
    result: TeacherResult, tracker: MlflowTracker, tracking_uri: str
) -> dict[str, Any]:
    """Registers a teacher job's teacher (``register_teacher``); the links for its outputs, in
    the shape a distillation job's single student has (``model``)."""
    version = register_teacher(tracking_uri, tracker, result)
    return {
        "mlflow": {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id},
        "model": version.link(),
    }


def register_teacher(
    tracking_uri: str, tracker: MlflowTracker, result: TeacherResult
) -> RegisteredVersion:
    """The version of ``<project>.<teacher arch>-teacher`` holding the teacher this job trained,
    logged on the job's run as a pyfunc (the students' "models from code"), with lineage tags,
    its validation metrics as model metrics and the ``candidate`` alias when it is the newest.

    Idempotent per job, as a student's registration is: a retry after a crash finds the version
    the dead attempt made. ``result.spec`` is the resolved spec (local paths); the weights a
    fine-tune started from are recorded as the user wrote them (the run's ``teacher.weights``
    parameter).
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    use_process_tracking_uri(tracking_uri)
    spec = result.spec
    name = teacher_model_name(tracker.project, spec.teacher.arch)
    _get_or_create_registered_model(
        client,
        name,
        tracker.project,
        TEACHER_KIND,
        f"{spec.teacher.arch} teachers trained by project {tracker.project}'s teacher jobs; "
        "name one in a distillation job as teacher.weights.",
    )
    started_from = "none"  # trained from scratch
    if spec.teacher.weights is not None:
        as_written = client.get_run(tracker.run_id).data.params.get("teacher.weights")
        started_from = as_written or spec.teacher.weights
    lineage = {
        VERSION_JOB_ID_TAG: tracker.job_id,
        PROJECT_TAG: tracker.project,
        VERSION_TASK_TAG: spec.task,
        VERSION_SEED_TAG: str(spec.seed),
        VERSION_ARCH_TAG: spec.teacher.arch,
        VERSION_TEACHER_WEIGHTS_TAG: started_from,
        DATA_FINGERPRINT_TAG: data_fingerprint(spec),
        WEIGHTS_SHA256_TAG: file_sha256(result.workdir.teacher),
    }
    network = TrainedNetwork(
        TEACHER_MODEL_NAME,
        TEACHER_MODEL_TYPE,
        result.workdir.teacher,
        result.workdir.model_spec,
        spec.task,
        result.num_classes,
        result.metrics,
    )
    version = _find_or_create_version(
        client,
        name,
        lineage,
        lambda: _log_network_model(
            client, tracker.experiment_id, tracker.run_id, network, result.input_example
        ),
        identity=TEACHER_IDENTITY_TAGS,
    )
    _move_alias_to_newest(client, name, CANDIDATE_ALIAS, str(version.version))
    return RegisteredVersion.of(name, version)


def student_pip_requirements() -> list[str]:
    """What the student's pyfunc needs, pinned to what trained it; not maskd, whose code
    travels with the model (``_stage_core_source``).

    Pinned explicitly: inferring them costs about 5 s and a subprocess per model. torchvision is
    listed because ``maskd_core.models`` builds on it; pydantic and numpy because the shipped
    ``maskd_core`` and the pyfunc's own code import them.
    """
    import pydantic
    import torch
    import torchvision

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"pydantic=={pydantic.VERSION}",
    ]


def _stage_core_source(into: Path) -> Path:
    """A copy of the installed ``maskd_core`` package's source under ``into``, without compiled
    caches: the code MLflow stores beside the student, so ``student_model.py`` can rebuild the
    network where maskd is not installed."""
    import maskd_core

    source = Path(maskd_core.__file__).parent
    target = into / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _signature(task: str, num_classes: int) -> ModelSignature:
    """Batch, height and width are free: the networks are fully convolutional. Detection
    students have no output schema: their pyfunc contract is not defined yet."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=(
            Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1))])
            if task == "segmentation"
            else None
        ),
    )


def register_student(
    tracking_uri: str,
    run_id: str,
    project: str,
    student: StudentRun,
    num_classes: int,
    example: np.ndarray | None,
    *,
    model_run_id: str | None = None,
    alias: str | None = CANDIDATE_ALIAS,
    export: Mapping[str, Any] | None = None,
) -> RegisteredVersion:
    """The version of ``student`` in the registry, with lineage tags and ``alias`` on it.

    ``export`` is the student's export report (``maskd_core.export``): its accepted files are
    logged beside the model and its statuses, parity and latencies become version tags
    (``_export_tags``), so the registry shows what the distillation bought.

    Idempotent per (job, method, seed): an attempt killed after registering is retried from its
    checkpoints and registers again, and a job must still end with one version per student. So
    the version is found by its identity tags before one is created (``_find_or_create_version``)
    and what the dead attempt may not have written (tags, the alias) is completed.

    ``student.spec`` is the resolved spec (local paths) of this student, whose method and seed
    the version's tags record; the weights source the user wrote is read back from the job's
    run (``run_id``) ``teacher.weights`` parameter. ``model_run_id`` is the run the model is
    logged on (the job's run when None). ``example`` (two validation images) becomes the input
    example: two, not one, since an example of batch 1 is easily read as "the batch size is 1".
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    use_process_tracking_uri(tracking_uri)
    run = client.get_run(run_id)
    name = registered_model_name(project, student.spec.name)
    _get_or_create_registered_model(
        client, name, project, STUDENT_KIND, f"MasKD students distilled by project {project}."
    )
    lineage = _lineage(student, project, run.data.tags, run.data.params)
    version = _find_or_create_version(
        client,
        name,
        lineage,
        lambda: log_student_model(
            client,
            run.info.experiment_id,
            model_run_id or run_id,
            student,
            num_classes,
            example,
            export=export,
        ),
    )
    for key, value in _export_tags(export or {}).items():
        client.set_model_version_tag(name, str(version.version), key, value)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion.of(name, version)


TOKENS_IDENTITY_TAGS = (TOKENS_JOB_ID_TAG, FINGERPRINT_TAG)
"""The lineage tags that say which stage 1 a tokens version holds: one version per job's tokens."""


def register_tokens(
    tracking_uri: str, tracker: MlflowTracker, tokens_path: Path | None
) -> RegisteredVersion | None:
    """The version of ``<project>.<teacher arch>-tokens`` holding the tokens this job learned
    (``tokens_path``), registered once per job; None when it learned none here.

    A job learned them when its stage-1 run carries the tokens checksum: the tracker tags it
    after uploading them. Jobs whose tokens were reused or named (``stage1.from_model``) have no
    stage-1 run, so tokens are registered once, by the job that learned them. The version is
    linked to the stage-1 run (its curves and mask images) and gets the ``candidate`` alias when
    it is the newest (``_move_alias_to_newest``).
    """
    stage1_run_id = tracker.stage_run(STAGE1)
    if tokens_path is None or stage1_run_id is None:
        return None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    stage1_run = client.get_run(stage1_run_id)
    if TOKENS_SHA256_TAG not in stage1_run.data.tags:
        return None
    spec = tracker.spec
    name = tokens_model_name(tracker.project, spec.teacher.arch)
    _get_or_create_registered_model(
        client,
        name,
        tracker.project,
        TOKENS_KIND,
        f"MasKD stage-1 tokens learned on {spec.teacher.arch} teachers by project "
        f"{tracker.project}; name one in a job as stage1.from_model.",
    )
    teacher_source = client.get_run(tracker.run_id).data.params.get("teacher.weights")
    lineage = _tokens_lineage(spec, tracker, teacher_source, file_sha256(tokens_path))
    version = _find_or_create_version(
        client,
        name,
        lineage,
        lambda: _log_tokens_model(client, stage1_run, tokens_path, lineage[TOKENS_SHA256_TAG]),
        identity=TOKENS_IDENTITY_TAGS,
    )
    _move_alias_to_newest(client, name, CANDIDATE_ALIAS, str(version.version))
    return RegisteredVersion.of(name, version)


def _tokens_lineage(
    spec: JobSpec, tracker: MlflowTracker, teacher_source: str | None, tokens_sha256: str
) -> dict[str, str]:
    """What the tokens were learned from and with: what ``service.model_uris`` checks a job
    naming them against, and what a person browsing reads."""
    teacher_weights = spec.teacher.weights
    return {
        TOKENS_JOB_ID_TAG: tracker.job_id,
        PROJECT_TAG: tracker.project,
        FINGERPRINT_TAG: tracker.fingerprint,
        DATA_FINGERPRINT_TAG: data_fingerprint(spec),
        TOKENS_SHA256_TAG: tokens_sha256,
        VERSION_TASK_TAG: spec.task,
        VERSION_SEED_TAG: str(spec.seed),
        VERSION_TEACHER_ARCH_TAG: spec.teacher.arch,
        VERSION_TEACHER_WEIGHTS_TAG: teacher_source or str(teacher_weights),
        VERSION_TEACHER_SHA256_TAG: file_sha256(teacher_weights) if teacher_weights else "none",
        TOKENS_TEACHER_LAYERS_TAG: json.dumps(spec.teacher.tapped_layers),
        TOKENS_COUNT_TAG: str(spec.stage1.tokens),
        TOKENS_MASK_WEIGHTING_TAG: "true" if spec.stage1.mask_weighting else "false",
    }


def _log_tokens_model(
    client: MlflowClient, stage1_run: Run, tokens_path: Path, tokens_sha256: str
) -> LoggedModel:
    """The tokens as a logged model of the stage-1 run, with the run's mask images and final
    metrics; one an earlier attempt finished (READY, same checksum) is taken instead."""
    run_id = stage1_run.info.run_id

    def write_files(logged: LoggedModel) -> LoggedModel:
        with tempfile.TemporaryDirectory(prefix="maskd-tokens-model-") as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            shutil.copyfile(tokens_path, folder / MODEL_TOKENS_ARTIFACT)
            _copy_mask_images(client, run_id, Path(tmp) / "run", folder / MODEL_MASKS_ARTIFACT_DIR)
            client.log_model_artifacts(logged.model_id, str(folder))
        return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)

    return _log_model_once(
        client,
        stage1_run.info.experiment_id,
        run_id,
        name=TOKENS_MODEL_NAME,
        model_type=TOKENS_MODEL_TYPE,
        checksum_tag=TOKENS_SHA256_TAG,
        checksum=tokens_sha256,
        metrics=stage1_run.data.metrics,
        write_files=write_files,
    )


MASK_IMAGES_DIR = "images"
"""Where ``MlflowClient.log_image`` puts a run's images (the tracker's masks among them)."""


def _copy_mask_images(client: MlflowClient, run_id: str, scratch: Path, target: Path) -> None:
    """The PNG images of the stage-1 run (its token masks) into ``target``."""
    if not client.list_artifacts(run_id, MASK_IMAGES_DIR):
        return
    downloaded = Path(client.download_artifacts(run_id, MASK_IMAGES_DIR, dst_path=str(scratch)))
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted(downloaded.rglob("*.png")):
        shutil.copyfile(image, target / image.name)


def _move_alias_to_newest(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Points ``alias`` at ``version`` unless it already names a newer one, so the retry of an
    older job never moves it back."""
    current = client.get_registered_model(name).aliases.get(alias)
    if current is None or int(current) < int(version):
        client.set_registered_model_alias(name, alias, version)


VERSION_IDENTITY_TAGS = (VERSION_JOB_ID_TAG, VERSION_METHOD_TAG, VERSION_SEED_TAG)
"""The lineage tags that say which student a version is: one version per job, method and seed."""


def _find_or_create_version(
    client: MlflowClient,
    name: str,
    lineage: Mapping[str, str],
    log_model: Callable[[], LoggedModel],
    identity: tuple[str, ...] = VERSION_IDENTITY_TAGS,
) -> ModelVersion:
    """The one place that decides whether a student (or tokens) get a new version of ``name``.

    ``identity`` are the lineage tags that say which student (or which job's tokens) a version
    holds.

    A version carrying those identity tags is reused: the attempt that made it died
    before the job was recorded as registered. Its tags were written with it, in one call, but
    any lineage tag it lacks is written now. Otherwise the model is logged (``log_model``) and a
    version created. Two registrars at once (a worker that lost its lease while registering,
    and its successor) would each create one; both then keep the lowest-numbered, and the
    other is deleted by the registrar that made it.
    """
    found = _find_version(client, name, lineage, identity)
    if found is not None:
        for key, value in lineage.items():
            if key not in found.tags:
                client.set_model_version_tag(name, str(found.version), key, value)
        return found
    logged = log_model()
    created = client.create_model_version(
        name,
        source=f"models:/{logged.model_id}",
        run_id=logged.source_run_id,
        tags=dict(lineage),
        model_id=logged.model_id,
    )
    first = _find_version(client, name, lineage, identity)
    if first is not None and str(first.version) != str(created.version):
        client.delete_model_version(name, str(created.version))
        return first
    return created


def _find_version(
    client: MlflowClient, name: str, lineage: Mapping[str, str], identity: tuple[str, ...]
) -> ModelVersion | None:
    """The oldest version of ``name`` with the ``identity`` tags of ``lineage``, if any."""
    conditions = [f"name = '{quoted(name)}'"] + [
        f"tags.`{key}` = '{quoted(lineage[key])}'" for key in identity
    ]
    found = client.search_model_versions(
        " and ".join(conditions), max_results=1, order_by=["version_number ASC"]
    )
    return found[0] if found else None


def log_student_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    student: StudentRun,
    num_classes: int,
    example: np.ndarray | None,
    *,
    export: Mapping[str, Any] | None = None,
) -> LoggedModel:
    """``student`` as a pyfunc model on run ``run_id``, logged by an earlier attempt if one
    finished logging these very weights there, else logged now; with ``export`` (its report),
    its accepted exports and their report beside it and their numbers among its metrics.

    Finding it again (``_log_model_once``) spares uploading the weights twice after a crash
    between logging and registering.
    """
    return _log_network_model(
        client,
        experiment_id,
        run_id,
        TrainedNetwork(
            STUDENT_MODEL_NAME,
            STUDENT_MODEL_TYPE,
            student.workdir.student,
            student.workdir.model_spec,
            student.spec.task,
            num_classes,
            {**student.metrics, **_export_metrics(export or {})},
            student.workdir.export_dir if export else None,
        ),
        example,
    )


@dataclass(frozen=True)
class TrainedNetwork:
    """A trained network's files as a pyfunc is logged from them: a student, or the teacher of
    a teacher job, which the same "models from code" file rebuilds."""

    name: str
    """The logged model's name (and artifact folder) on its run."""
    model_type: str
    weights: Path
    model_spec: Path
    """The document that rebuilds the network (``maskd_core.models.model_document``)."""
    task: str
    num_classes: int
    metrics: Mapping[str, float]
    export_dir: Path | None = None
    """A student's exports and their report (``WorkDir.export_dir``), logged beside it."""


def _log_network_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    network: TrainedNetwork,
    example: np.ndarray | None,
) -> LoggedModel:
    """``network`` as a pyfunc model on run ``run_id`` (``log_student_model``)."""

    def write_files(logged: LoggedModel) -> LoggedModel:
        with tempfile.TemporaryDirectory(prefix="maskd-model-code-") as code_dir:
            mlflow.pyfunc.log_model(
                name=network.name,
                python_model=str(files("workers") / STUDENT_MODEL_CODE),
                artifacts={"weights": str(network.weights), "model_spec": str(network.model_spec)},
                code_paths=[str(_stage_core_source(Path(code_dir)))],
                pip_requirements=student_pip_requirements(),
                signature=_signature(network.task, network.num_classes),
                input_example=example,
                model_id=logged.model_id,
            )
        if network.export_dir is not None and network.export_dir.is_dir():
            client.log_model_artifacts(
                logged.model_id, str(network.export_dir), artifact_path=MODEL_EXPORT_ARTIFACT_DIR
            )
        return logged

    return _log_model_once(
        client,
        experiment_id,
        run_id,
        name=network.name,
        model_type=network.model_type,
        checksum_tag=WEIGHTS_SHA256_TAG,
        checksum=file_sha256(network.weights),
        metrics=network.metrics,
        write_files=write_files,
    )


def _log_model_once(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    *,
    name: str,
    model_type: str,
    checksum_tag: str,
    checksum: str,
    metrics: Mapping[str, float],
    write_files: Callable[[LoggedModel], LoggedModel],
) -> LoggedModel:
    """The logged model ``name`` of run ``run_id`` holding the file with ``checksum``: the one
    an earlier attempt finished (READY), else a new one, made the run's output, given
    ``metrics`` and then its files (``write_files``, which returns it as logged).

    MLflow marks a logged model READY only after its files are written, and the run's output
    link is made before them, so a READY one with the checksum is complete; one whose attempt
    died while logging stays PENDING and is passed over.
    """
    # The status is matched here, not in the filter: MLflow's SQL store compares a status
    # filter with the integer it stores and never matches.
    earlier = client.search_logged_models(
        [experiment_id],
        filter_string=f"source_run_id = '{quoted(run_id)}' AND name = '{name}' "
        f"AND tags.`{checksum_tag}` = '{checksum}'",
    )
    for model in earlier:
        if model.status == LoggedModelStatus.READY:
            return model
    logged = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=run_id,
        tags={checksum_tag: checksum},
        model_type=model_type,
    )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    _log_model_metrics(client, run_id, logged.model_id, metrics)
    return write_files(logged)


def _log_model_metrics(
    client: MlflowClient, run_id: str, model_id: str, metrics: Mapping[str, float]
) -> None:
    """``metrics`` as the logged model's own (MLflow 3 shows them on the registered version).

    Logged before the model's files, which mark it READY: a READY model found again after a
    crash (``log_student_model``) therefore has its metrics.
    """
    now = int(time.time() * 1000)
    rows = [Metric(key, float(value), now, 0, model_id=model_id) for key, value in metrics.items()]
    if rows:
        client.log_batch(run_id, metrics=rows)


def _lineage(
    student: StudentRun, project: str, run_tags: Mapping[str, str], run_params: Mapping[str, str]
) -> dict[str, str]:
    """Where the version came from: job, method, seed, teacher, data, tokens and its own
    checksum. Its evaluation metrics are not here: they are the logged model's metrics."""
    spec = student.spec
    teacher_weights = spec.teacher.weights
    lineage = {
        VERSION_JOB_ID_TAG: str(run_tags.get(JOB_ID_TAG, "")),
        PROJECT_TAG: project,
        VERSION_METHOD_TAG: spec.stage2.method.name,
        VERSION_SEED_TAG: str(spec.seed),
        VERSION_TASK_TAG: spec.task,
        VERSION_ARCH_TAG: spec.distilled_student.arch,
        VERSION_TEACHER_ARCH_TAG: spec.teacher.arch,
        VERSION_TEACHER_WEIGHTS_TAG: run_params.get("teacher.weights", str(teacher_weights)),
        VERSION_TEACHER_SHA256_TAG: file_sha256(teacher_weights) if teacher_weights else "none",
        FINGERPRINT_TAG: stage1_fingerprint(spec),
        WEIGHTS_SHA256_TAG: file_sha256(student.workdir.student),
    }
    for tag in (REUSED_FROM_JOB_TAG, TOKENS_FROM_MODEL_TAG):
        if run_tags.get(tag):
            lineage[tag] = run_tags[tag]
    return lineage


def _get_or_create_registered_model(
    client: MlflowClient, name: str, project: str, kind: str, description: str
) -> None:
    """Creates the model with its project and kind tags, or checks an existing one is this
    project's.

    The check matters: names are registry-wide, and adding a version to a model another
    project owns would put our weights in their registry.
    """
    try:
        client.create_registered_model(
            name, tags={PROJECT_TAG: project, MODEL_KIND_TAG: kind}, description=description
        )
        return
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model = client.get_registered_model(name)
    if model.tags.get(PROJECT_TAG) != project:
        raise RuntimeError(f"registered model {name!r} belongs to another project")
    if MODEL_KIND_TAG not in model.tags:
        client.set_registered_model_tag(name, MODEL_KIND_TAG, kind)


def _export_tags(report: Mapping[str, Any]) -> dict[str, str]:
    """A student's export report as version tags: each format's status (and, when checked,
    its parity numbers and checksum), and each model's latency and speed-up over the teacher."""
    tags: dict[str, str] = {}
    for export_format, entry in report.get("exports", {}).items():
        tags[export_status_tag(export_format)] = str(entry["status"])
        for number in ("max_abs_diff", "metric_delta"):
            if entry.get(number) is not None:
                tags[export_parity_tag(export_format, number)] = f"{entry[number]:.6g}"
        if entry.get("sha256"):
            tags[export_sha256_tag(export_format)] = str(entry["sha256"])
    for model, milliseconds in report.get("latency_ms", {}).items():
        tags[latency_tag(model)] = f"{milliseconds:.4g}"
    for model, ratio in report.get("speedup", {}).items():
        tags[speedup_tag(model)] = f"{ratio:.3g}"
    return tags


def _export_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The report's numbers as the logged model's metrics (charted by MLflow's UI)."""
    metrics = {latency_metric(m): float(v) for m, v in report.get("latency_ms", {}).items()}
    metrics |= {speedup_metric(m): float(v) for m, v in report.get("speedup", {}).items()}
    for export_format, entry in report.get("exports", {}).items():
        for number in ("max_abs_diff", "metric_delta"):
            value = entry.get(number)
            if value is not None and np.isfinite(value):
                metrics[export_parity_metric(export_format, number)] = float(value)
    return metrics
