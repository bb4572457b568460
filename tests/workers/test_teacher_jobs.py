"""Teacher jobs (``kind: teacher``) end to end, on a real MLflow (SQLite-backed, no mocks).

A teacher job runs through ``maskd.run_job``'s body, trains ``seg_tiny_teacher`` on the
procedural shapes and registers it as ``acme.seg_tiny_teacher-teacher``; a distillation job then
names it as ``models:/acme.seg_tiny_teacher-teacher@candidate`` and registers its student.
Another project cannot name it, and the API refuses the fields a kind does not have.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from tracking_testkit import PROJECT, open_store, run_through_the_worker, sqlite_settings

from maskd_core.errors import SpecError
from maskd_core.files import file_sha256
from maskd_core.spec import JobSpec
from service.config import Settings
from service.main import create_app
from service.mlflow_names import (
    DATA_FINGERPRINT_TAG,
    MODEL_KIND_TAG,
    PROJECT_TAG,
    VERSION_ARCH_TAG,
    VERSION_JOB_ID_TAG,
    VERSION_TEACHER_WEIGHTS_TAG,
    WEIGHTS_SHA256_TAG,
    teacher_model_name,
)
from service.model_uris import resolve_registry_weights
from service.store import JobRecord
from workers.token_reuse import data_fingerprint

torch.set_num_threads(1)

# Real jobs trained, tracked and registered end to end.
pytestmark = pytest.mark.slow

TEACHER_MODEL = teacher_model_name(PROJECT, "seg_tiny_teacher")
TEACHER_ITERATIONS = 6

TEACHER = {
    "arch": "seg_tiny_teacher",
    "args": {"base_channels": 8, "context_blocks": 1},
    "layers": ["head"],
}
STUDENT = {
    "arch": "seg_tiny_student",
    "args": {"base_channels": 4, "context_blocks": 0},
    "layers": ["head"],
}
COMMON: dict[str, Any] = {
    "dataset": {"args": {"num_samples": 12, "image_size": 32}},
    "batch_size": 4,
    "device": "cpu",
    "checkpoint_every": 100,
}


def teacher_job(**changes: Any) -> dict[str, Any]:
    """A teacher job's body: no student, a recipe of its own."""
    return {
        "name": "teacher-job",
        "kind": "teacher",
        "teacher": TEACHER,
        "teacher_training": {
            "iterations": TEACHER_ITERATIONS,
            "optimizer": {"name": "adam", "lr": 0.01},
        },
        **COMMON,
        **changes,
    }


def distill_job(teacher_weights: str, **changes: Any) -> dict[str, Any]:
    return {
        "name": "distilled-from-registered-teacher",
        "teacher": {**TEACHER, "weights": teacher_weights},
        "student": STUDENT,
        "stage1": {"tokens": 2, "iterations": 3},
        "stage2": {"iterations": 3},
        **COMMON,
        **changes,
    }


@dataclass
class TrainedTeacher:
    tracking_uri: str
    root: Path
    settings: Settings
    record: JobRecord
    messages: list[str]

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedTeacher:
    """A teacher job through the worker's task body, as a worker runs it."""
    root = tmp_path_factory.mktemp("teacher-jobs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    settings = sqlite_settings(root, uri)
    record, events = run_through_the_worker(settings, JobSpec.model_validate(teacher_job()))
    return TrainedTeacher(uri, root, settings, record, [e.message or "" for e in events])


def test_a_teacher_job_registers_its_teacher_with_lineage(trained: TrainedTeacher) -> None:
    record, client = trained.record, trained.client
    assert record.outputs["model"] == {
        "name": TEACHER_MODEL,
        "version": "1",
        "uri": f"models:/{TEACHER_MODEL}/1",
    }
    workdir = trained.settings.job_workdir(record.id)
    assert record.outputs["files"] == {
        "teacher": str(workdir.teacher),
        "summary": str(workdir.summary),
    }
    assert set(record.outputs["metrics"]) >= {"teacher_miou", "teacher_pixel_acc"}
    assert not workdir.tokens.exists() and not workdir.student.exists()
    assert f"teacher started at step 0 of {TEACHER_ITERATIONS}" in trained.messages
    assert record.progress["teacher"]["step"] == TEACHER_ITERATIONS

    model = client.get_registered_model(TEACHER_MODEL)
    assert model.tags[PROJECT_TAG] == PROJECT and model.tags[MODEL_KIND_TAG] == "teacher"
    assert str(model.aliases["candidate"]) == "1"
    version = client.get_model_version(TEACHER_MODEL, "1")
    spec = record.spec
    assert version.tags[VERSION_JOB_ID_TAG] == record.id
    assert version.tags[VERSION_ARCH_TAG] == "seg_tiny_teacher"
    assert version.tags[VERSION_TEACHER_WEIGHTS_TAG] == "none"  # trained from scratch
    assert version.tags[DATA_FINGERPRINT_TAG] == data_fingerprint(spec)
    assert version.tags[WEIGHTS_SHA256_TAG] == file_sha256(workdir.teacher)

    logged = client.get_logged_model(str(version.source).removeprefix("models:/"))
    metrics = {metric.key: metric.value for metric in logged.metrics or []}
    assert metrics["teacher_miou"] == pytest.approx(record.outputs["metrics"]["teacher_miou"])
    run = client.get_run(record.outputs["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["kind"] == "teacher"
    assert run.data.params["teacher_training.iterations"] == str(TEACHER_ITERATIONS)
    assert run.data.params["teacher_training.optimizer.name"] == "adam"
    assert {"teacher_miou", "task_loss", "lr"} <= set(run.data.metrics)


def test_a_retried_registration_keeps_one_version(trained: TrainedTeacher) -> None:
    """A worker killed in REGISTERING retries: the job's version is found, not made again."""
    from maskd_core.runner import run_teacher_job
    from workers.publishing import publish_teacher
    from workers.tracking import job_tracker

    record = trained.record
    workdir = trained.settings.job_workdir(record.id)
    tracker = job_tracker(
        trained.tracking_uri, PROJECT, record.id, record.spec, trained.root / "mlartifacts"
    )
    result = run_teacher_job(record.spec, workdir.root)  # finished: read back, not retrained
    links = publish_teacher(result, tracker, trained.tracking_uri)
    tracker.finish()
    assert links["model"] == record.outputs["model"]
    versions = trained.client.search_model_versions(f"name = '{TEACHER_MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]


def test_a_distillation_job_names_the_registered_teacher(
    trained: TrainedTeacher, tmp_path: Path
) -> None:
    uri = f"models:/{TEACHER_MODEL}@candidate"
    settings = sqlite_settings(tmp_path, trained.tracking_uri)
    record, _ = run_through_the_worker(settings, JobSpec.model_validate(distill_job(uri)))
    assert record.spec.teacher.weights == uri  # the stored spec keeps what the user wrote
    student = trained.client.get_model_version(record.outputs["model"]["name"], "1")
    assert student.tags["maskd.teacher.weights"] == uri
    teacher_file = trained.settings.job_workdir(trained.record.id).teacher
    assert student.tags["maskd.teacher.weights_sha256"] == file_sha256(teacher_file)
    assert "student_miou" in record.outputs["metrics"]


def test_another_projects_teacher_is_refused_like_a_missing_one(
    trained: TrainedTeacher, tmp_path: Path
) -> None:
    spec = JobSpec.model_validate(distill_job(f"models:/{TEACHER_MODEL}@candidate"))
    resolved = resolve_registry_weights(spec, PROJECT, trained.tracking_uri, tmp_path)
    assert resolved.teacher.weights is not None
    assert file_sha256(resolved.teacher.weights) == file_sha256(
        trained.settings.job_workdir(trained.record.id).teacher
    )
    with pytest.raises(SpecError) as other:
        resolve_registry_weights(spec, "globex", trained.tracking_uri, tmp_path)
    assert other.value.field == "teacher.weights"
    missing_uri = "models:/globex.seg_tiny_teacher-teacher@candidate"
    missing = JobSpec.model_validate(distill_job(missing_uri))
    with pytest.raises(SpecError) as absent:
        resolve_registry_weights(missing, "globex", trained.tracking_uri, tmp_path)
    assert str(other.value).replace(f"models:/{TEACHER_MODEL}@candidate", missing_uri) == str(
        absent.value
    )
    with pytest.raises(SpecError, match="a model of trained teachers, not of stage-1 tokens"):
        resolve_registry_weights(
            spec.model_copy(
                update={
                    "stage1": spec.stage1.model_copy(
                        update={"from_model": f"models:/{TEACHER_MODEL}/1"}
                    )
                }
            ),
            PROJECT,
            trained.tracking_uri,
            tmp_path,
        )


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        (teacher_job(student=STUDENT), ["body", "student"], "has no student"),
        (
            teacher_job(comparison={"methods": ["maskd"], "seeds": [0]}),
            ["body", "comparison"],
            "has no comparison",
        ),
        (teacher_job(teacher_training=None), ["body", "teacher_training"], "needs its recipe"),
        (
            {k: v for k, v in distill_job("").items() if k != "student"},
            ["body", "student"],
            "a distillation job needs a student",
        ),
        (
            teacher_job(teacher_training={"iterations": 10**9, "optimizer": {"lr": 0.1}}),
            ["body", "teacher_training", "iterations"],
            "above this service's limit",
        ),
    ],
)
def test_the_api_refuses_fields_a_kind_does_not_have(
    trained: TrainedTeacher, body: dict[str, Any], loc: list[str], message: str
) -> None:
    with open_store(trained.settings) as store:
        headers = {"Authorization": f"Bearer {store.create_api_key(PROJECT)}"}
    with TestClient(create_app(trained.settings)) as http:
        refused = http.post("/v1/jobs", json=body, headers=headers)
    assert refused.status_code == 422, refused.text
    problems = refused.json()["detail"]
    assert any(p["loc"] == loc and message in p["msg"] for p in problems), problems


def test_a_teacher_job_is_submitted_listed_and_cancelled_through_the_api(
    trained: TrainedTeacher,
) -> None:
    """The API's dry run validates a teacher job (no student to probe); the job is listed
    with its kind and can be cancelled like any other; the registered teacher's state dict is
    served like a student's."""
    with open_store(trained.settings) as store:
        headers = {"Authorization": f"Bearer {store.create_api_key(PROJECT)}"}
    with TestClient(create_app(trained.settings)) as http:
        created = http.post("/v1/jobs", json=teacher_job(name="via-api"), headers=headers)
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["spec"]["kind"] == "teacher" and job["spec"]["student"] is None
        listed = http.get("/v1/jobs", params={"name": "via-api"}, headers=headers).json()
        cancelled = http.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
        weights = http.get(f"/v1/models/{TEACHER_MODEL}/versions/1/weights", headers=headers)
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "CANCELLED"
    assert weights.status_code == 200
    teacher_file = trained.settings.job_workdir(trained.record.id).teacher
    assert weights.content == teacher_file.read_bytes()
