"""The REGISTERING step: every student of a finished job into the MLflow Model Registry.

Each student is logged as a pyfunc model ("models from code": ``workers/student_model.py``,
its state dict and the ``model_spec.json`` the core wrote beside it) and registered as a version
of the job's registered model, ``<project>.<job name>-student``, with lineage tags
(``service.mlflow_names``). A single job's student is logged on the job's run and gets the
``candidate`` alias. A comparison registers every (method, seed) student as a version of the
same model, each logged on its own nested run and told apart by the method and seed tags; no
alias moves, since which method wins is for the user to read from the table, not for the last
run to decide.

Registration happens exactly once per (job, method, seed) student, across crashes: a worker
killed after registering leaves the job in REGISTERING, and the retry finds the version (and
the logged model) the dead attempt made instead of making another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from maskd_core.files import file_sha256
from service.mlflow_names import (
    CANDIDATE_ALIAS,
    FINGERPRINT_TAG,
    JOB_ID_TAG,
    PROJECT_TAG,
    REUSED_FROM_JOB_TAG,
    STUDENT_MODEL_NAME,
    STUDENT_MODEL_TYPE,
    VERSION_ARCH_TAG,
    VERSION_JOB_ID_TAG,
    VERSION_METHOD_TAG,
    VERSION_METRIC_TAG_PREFIX,
    VERSION_SEED_TAG,
    VERSION_TASK_TAG,
    VERSION_TEACHER_ARCH_TAG,
    VERSION_TEACHER_SHA256_TAG,
    VERSION_TEACHER_WEIGHTS_TAG,
    WEIGHTS_SHA256_TAG,
    quoted,
    registered_model_name,
)
from workers.token_reuse import stage1_fingerprint

if TYPE_CHECKING:
    from maskd_core.runner import JobResult, StudentRun
    from workers.mlflow_tracker import MlflowTracker

STUDENT_MODEL_CODE = "student_model.py"
"""The "models from code" file of this package that MLflow stores with each student."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    uri: str
    """``models:/NAME/VERSION``: usable as a later job's ``teacher.weights``."""


def publish(result: JobResult, tracker: MlflowTracker, tracking_uri: str) -> dict[str, Any]:
    """Registers the job's student(s) on its MLflow runs; returns the links for its outputs."""
    links: dict[str, Any] = {
        "mlflow": {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id}
    }
    comparison = result.comparison is not None
    models = []
    for run in result.runs:
        version = register_student(
            tracking_uri,
            tracker.run_id,
            tracker.project,
            run,
            result.plan.num_classes,
            result.input_example,
            model_run_id=tracker.stage_run(run.stage) if comparison else None,
            alias=None if comparison else CANDIDATE_ALIAS,
        )
        models.append({"name": version.name, "version": version.version, "uri": version.uri})
    if comparison:
        tracker.log_comparison(result.metrics)
        links["models"] = [
            {"method": run.method.name, "seed": run.seed, **model}
            for run, model in zip(result.runs, models, strict=True)
        ]
    else:
        links["model"] = models[0]
    return links


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
) -> RegisteredVersion:
    """The version of ``student`` in the registry, with lineage tags and ``alias`` on it.

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
    # pyfunc.log_model resolves the store from the process-wide URI; set it explicitly so it
    # can never be a default.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    run = client.get_run(run_id)
    name = registered_model_name(project, student.spec.name)
    _get_or_create_registered_model(client, name, project)
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
        ),
    )
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return RegisteredVersion(
        name=name, version=str(version.version), uri=f"models:/{name}/{version.version}"
    )


VERSION_IDENTITY_TAGS = (VERSION_JOB_ID_TAG, VERSION_METHOD_TAG, VERSION_SEED_TAG)
"""The lineage tags that say which student a version is: one version per job, method and seed."""


def _find_or_create_version(
    client: MlflowClient,
    name: str,
    lineage: Mapping[str, str],
    log_model: Callable[[], LoggedModel],
) -> ModelVersion:
    """The one place that decides whether a student gets a new version of ``name``.

    A version carrying the student's identity tags is reused: the attempt that made it died
    before the job was recorded as registered. Its tags were written with it, in one call, but
    any lineage tag it lacks is written now. Otherwise the model is logged (``log_model``) and a
    version created. Two registrars at once (a worker that lost its lease while registering,
    and its successor) would each create one; both then keep the lowest-numbered, and the
    other is deleted by the registrar that made it.
    """
    found = _find_version(client, name, lineage)
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
    first = _find_version(client, name, lineage)
    if first is not None and str(first.version) != str(created.version):
        client.delete_model_version(name, str(created.version))
        return first
    return created


def _find_version(
    client: MlflowClient, name: str, lineage: Mapping[str, str]
) -> ModelVersion | None:
    """The oldest version of ``name`` with the identity tags of ``lineage``, if any."""
    conditions = [f"name = '{quoted(name)}'"] + [
        f"tags.`{key}` = '{quoted(lineage[key])}'" for key in VERSION_IDENTITY_TAGS
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
) -> LoggedModel:
    """``student`` as a pyfunc model on run ``run_id``, logged by an earlier attempt if one
    finished logging these very weights there, else logged now.

    MLflow marks a logged model READY only after its files are written, and the run's output
    link is made before them, so a READY one with the weights' checksum is complete; one whose
    attempt died while logging stays PENDING and is passed over. Finding it again spares
    uploading the weights twice after a crash between logging and registering.
    """
    weights_sha256 = file_sha256(student.workdir.student)
    # The status is matched here, not in the filter: MLflow's SQL store compares a status
    # filter with the integer it stores and never matches.
    earlier = client.search_logged_models(
        [experiment_id],
        filter_string=f"source_run_id = '{quoted(run_id)}' AND name = '{STUDENT_MODEL_NAME}' "
        f"AND tags.`{WEIGHTS_SHA256_TAG}` = '{weights_sha256}'",
    )
    for model in earlier:
        if model.status == LoggedModelStatus.READY:
            return model
    logged = client.create_logged_model(
        experiment_id,
        name=STUDENT_MODEL_NAME,
        source_run_id=run_id,
        tags={WEIGHTS_SHA256_TAG: weights_sha256},
        model_type=STUDENT_MODEL_TYPE,
    )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    mlflow.pyfunc.log_model(
        name=STUDENT_MODEL_NAME,
        python_model=str(files("workers") / STUDENT_MODEL_CODE),
        artifacts={
            "weights": str(student.workdir.student),
            "model_spec": str(student.workdir.model_spec),
        },
        pip_requirements=student_pip_requirements(),
        signature=_signature(student.spec.task, num_classes),
        input_example=example,
        model_id=logged.model_id,
    )
    return logged


def _lineage(
    student: StudentRun, project: str, run_tags: Mapping[str, str], run_params: Mapping[str, str]
) -> dict[str, str]:
    """Where the version came from: job, method, seed, teacher, data and its own checksum."""
    spec = student.spec
    teacher_weights = spec.teacher.weights
    lineage = {
        VERSION_JOB_ID_TAG: str(run_tags.get(JOB_ID_TAG, "")),
        PROJECT_TAG: project,
        VERSION_METHOD_TAG: spec.stage2.method.name,
        VERSION_SEED_TAG: str(spec.seed),
        VERSION_TASK_TAG: spec.task,
        VERSION_ARCH_TAG: spec.student.arch,
        VERSION_TEACHER_ARCH_TAG: spec.teacher.arch,
        VERSION_TEACHER_WEIGHTS_TAG: run_params.get("teacher.weights", str(teacher_weights)),
        VERSION_TEACHER_SHA256_TAG: file_sha256(teacher_weights) if teacher_weights else "none",
        FINGERPRINT_TAG: stage1_fingerprint(spec),
        WEIGHTS_SHA256_TAG: file_sha256(student.workdir.student),
        **{f"{VERSION_METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in student.metrics.items()},
    }
    reused = run_tags.get(REUSED_FROM_JOB_TAG)
    if reused:
        lineage[REUSED_FROM_JOB_TAG] = reused
    return lineage


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
