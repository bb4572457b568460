"""Stage-1 tokens in the Model Registry, and the student versions' metrics, on a real MLflow.

One tiny job is trained, tracked and published per module (SQLite-backed MLflow, no mocks):
its tokens become a version of ``acme.seg_tiny_teacher-tokens``; later jobs name that version
(``stage1.from_model``), through ``maskd.run_job``'s body, and are refused when it is another
project's or does not fit them.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import pytest
import torch
import tracking_testkit
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from tracking_testkit import (
    PROJECT,
    open_store,
    run_through_the_worker,
    save_random_teacher,
    sqlite_settings,
)

from maskd_core.callbacks import STAGE1
from maskd_core.errors import SpecError
from maskd_core.models import build_model
from maskd_core.runner import JobResult, run_job
from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir
from service.main import create_app
from service.mlflow_names import (
    DATA_FINGERPRINT_TAG,
    FINGERPRINT_TAG,
    MODEL_KIND_TAG,
    PROJECT_TAG,
    TOKENS_FROM_MODEL_TAG,
    TOKENS_JOB_ID_TAG,
    TOKENS_SHA256_TAG,
    VERSION_TEACHER_SHA256_TAG,
    tokens_model_name,
)
from service.model_uris import resolve_registry_weights
from workers.mlflow_tracker import MlflowTracker
from workers.publishing import publish
from workers.token_reuse import reuse_stage1_tokens, stage1_fingerprint
from workers.tracking import job_tracker

torch.set_num_threads(1)

# Real jobs trained, tracked and registered end to end.
pytestmark = pytest.mark.slow

TOKENS_MODEL = tokens_model_name(PROJECT, "seg_tiny_teacher")


def tiny_spec(teacher_weights: Path, **changes: Any) -> JobSpec:
    """The testkit's tiny job, named and sized as this module's source of tokens."""
    return tracking_testkit.tiny_spec(
        teacher_weights, **{"name": "tokens-source", "stage2": {"iterations": 3}, **changes}
    )


def naming(spec: JobSpec, uri: str, **stage1: Any) -> JobSpec:
    """``spec`` with ``stage1.from_model`` = ``uri`` (and ``stage1`` changes)."""
    return spec.model_copy(
        update={"stage1": spec.stage1.model_copy(update={"from_model": uri, **stage1})}
    )


@dataclass
class PublishedJob:
    tracking_uri: str
    root: Path
    spec: JobSpec
    tracker: MlflowTracker
    result: JobResult
    links: dict[str, Any]

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> PublishedJob:
    """What the worker does for a job that learns its stage 1: run, track, publish."""
    root = tmp_path_factory.mktemp("registry-tokens")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = tiny_spec(save_random_teacher(root))
    tracker = job_tracker(uri, PROJECT, "job-tokens", spec, root / "mlartifacts")
    result = run_job(spec, root / "jobs" / "job-tokens", callbacks=[tracker])
    links = publish(result, tracker, uri)
    tracker.finish()
    return PublishedJob(uri, root, spec, tracker, result, links)


def test_learned_tokens_are_registered_once_with_lineage_and_masks(
    job: PublishedJob, tmp_path: Path
) -> None:
    """A retried REGISTERING step publishes again: the tokens keep their one version."""
    again = publish(job.result, job.tracker, job.tracking_uri)
    assert (
        again["tokens"]
        == job.links["tokens"]
        == {
            "name": TOKENS_MODEL,
            "version": "1",
            "uri": f"models:/{TOKENS_MODEL}/1",
        }
    )
    client = job.client
    versions = client.search_model_versions(f"name = '{TOKENS_MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    model = client.get_registered_model(TOKENS_MODEL)
    assert model.tags[PROJECT_TAG] == PROJECT and model.tags[MODEL_KIND_TAG] == "tokens"
    assert str(model.aliases["candidate"]) == "1"

    version = client.get_model_version(TOKENS_MODEL, "1")
    tokens_file = job.result.tokens_path
    assert tokens_file is not None
    stage1_run = job.tracker.stage_run(STAGE1)
    assert version.run_id == stage1_run
    tags = version.tags
    assert tags[TOKENS_JOB_ID_TAG] == "job-tokens"
    assert tags[FINGERPRINT_TAG] == stage1_fingerprint(job.spec)
    assert len(tags[DATA_FINGERPRINT_TAG]) == 64
    assert tags["maskd.teacher.arch"] == "seg_tiny_teacher"
    assert tags["maskd.teacher.weights"] == str(job.root / "teacher.pt")
    assert len(tags[VERSION_TEACHER_SHA256_TAG]) == 64
    assert json.loads(tags["maskd.teacher.layers"]) == ["head"]
    assert (tags["maskd.tokens.count"], tags["maskd.tokens.mask_weighting"]) == ("2", "false")

    logged = client.get_logged_model(str(version.source).removeprefix("models:/"))
    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=logged.artifact_location, dst_path=str(tmp_path)
        )
    )
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.*"))
    masks = [name for name in files if name.startswith("masks/")]
    assert masks and all(name.endswith(".png") for name in masks)
    assert (folder / "tokens.pt").read_bytes() == tokens_file.read_bytes()
    assert tags[TOKENS_SHA256_TAG] == logged.tags[TOKENS_SHA256_TAG]


def test_student_versions_carry_their_metrics_as_model_metrics(job: PublishedJob) -> None:
    client = job.client
    model = job.links["model"]
    version = client.get_model_version(model["name"], model["version"])
    assert not any(key.startswith("maskd.metric.") for key in version.tags)
    logged = client.get_logged_model(str(version.source).removeprefix("models:/"))
    metrics = {metric.key: metric.value for metric in logged.metrics or []}
    assert metrics["student_miou"] == pytest.approx(job.result.metrics["student_miou"])
    assert set(job.result.runs[0].metrics) <= set(metrics)


def test_a_job_naming_registered_tokens_skips_stage1(job: PublishedJob, tmp_path: Path) -> None:
    """Through ``maskd.run_job``'s body: the named version's tokens are used although the
    fingerprint differs (more stage-1 iterations, reuse off), no stage 1 runs, and the
    student's version records where its tokens came from."""
    spec = naming(
        tiny_spec(job.root / "teacher.pt", name="named-tokens"),
        f"models:/{TOKENS_MODEL}@candidate",
        iterations=50,
        reuse=False,
    )
    settings = sqlite_settings(tmp_path, job.tracking_uri)
    record, events_seen = run_through_the_worker(settings, spec)
    events = [event.message for event in events_seen]
    assert f"stage 1 tokens from models:/{TOKENS_MODEL}/1 (learned by job job-tokens)" in events
    assert "tokens" not in record.outputs
    assert job.result.tokens_path is not None
    workdir = settings.job_workdir(record.id)
    assert workdir.tokens.read_bytes() == job.result.tokens_path.read_bytes()

    client = job.client
    stages = {
        run.data.tags["stage"]
        for run in client.search_runs(
            [job.tracker.experiment_id], filter_string=f"tags.job_id = '{record.id}'"
        )
    }
    assert stages == {"job", "stage2"}
    student = client.get_model_version(record.outputs["model"]["name"], "1")
    assert student.tags[TOKENS_FROM_MODEL_TAG] == f"models:/{TOKENS_MODEL}/1"
    assert [str(v.version) for v in client.search_model_versions(f"name = '{TOKENS_MODEL}'")] == [
        "1"
    ]


def test_tokens_of_another_project_or_kind_are_refused(job: PublishedJob, tmp_path: Path) -> None:
    spec = naming(tiny_spec(job.root / "teacher.pt"), f"models:/{TOKENS_MODEL}/1")
    assert resolve_registry_weights(spec, PROJECT, job.tracking_uri, tmp_path) == spec
    with pytest.raises(SpecError, match="does not name a registered tokens version") as other:
        resolve_registry_weights(spec, "globex", job.tracking_uri, tmp_path)
    assert other.value.field == "stage1.from_model"
    # Answered exactly like a model that does not exist: nothing tells the name is taken.
    missing_uri = "models:/globex.seg_tiny_teacher-tokens/1"
    with pytest.raises(SpecError) as missing:
        resolve_registry_weights(naming(spec, missing_uri), "globex", job.tracking_uri, tmp_path)
    assert str(other.value).replace(spec.stage1.from_model or "", missing_uri) == str(missing.value)
    student = naming(spec, f"models:/{job.links['model']['name']}@candidate")
    with pytest.raises(SpecError, match="a model of distilled students, not of stage-1 tokens"):
        resolve_registry_weights(student, PROJECT, job.tracking_uri, tmp_path)
    with pytest.raises(SpecError, match="does not name"):
        resolve_registry_weights(
            naming(spec, f"models:/{TOKENS_MODEL}/7"), PROJECT, job.tracking_uri, tmp_path
        )
    tokens_as_teacher = spec.model_copy(
        update={"teacher": spec.teacher.model_copy(update={"weights": f"models:/{TOKENS_MODEL}/1"})}
    )
    with pytest.raises(SpecError, match="holds stage-1 tokens, not network weights") as weights:
        resolve_registry_weights(tokens_as_teacher, PROJECT, job.tracking_uri, tmp_path)
    assert weights.value.field == "teacher.weights"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stage1": {"tokens": 3, "iterations": 3}}, "stage1.tokens = 2, but this job has 3"),
        (
            {"stage1": {"tokens": 2, "iterations": 3, "mask_weighting": True}},
            "stage1.mask_weighting = false, but this job has true",
        ),
        (
            {
                "teacher": {
                    "arch": "seg_tiny_teacher",
                    "args": {"base_channels": 8, "context_blocks": 1},
                    "layers": ["backbone"],
                }
            },
            'teacher.layers = ["head"], but this job has ["backbone"]',
        ),
    ],
)
def test_tokens_that_do_not_fit_the_job_are_refused(
    job: PublishedJob, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    spec = naming(
        tiny_spec(job.root / "teacher.pt", **changes), f"models:/{TOKENS_MODEL}@candidate"
    )
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        resolve_registry_weights(spec, PROJECT, job.tracking_uri, tmp_path)
    assert error.value.field == "stage1.from_model"


def test_the_worker_refuses_tokens_learned_on_other_teacher_weights(
    job: PublishedJob, tmp_path: Path
) -> None:
    other = build_model(job.spec.teacher.model_copy(update={"weights": None}), 5)
    torch.save(other.state_dict(), tmp_path / "other-teacher.pt")
    spec = naming(tiny_spec(tmp_path / "other-teacher.pt"), f"models:/{TOKENS_MODEL}/1")
    workdir = WorkDir(tmp_path / "job")
    with pytest.raises(SpecError, match="learned on teacher weights with SHA-256") as error:
        reuse_stage1_tokens(job.tracking_uri, PROJECT, spec, workdir, tmp_path / "cache")
    assert error.value.field == "stage1.from_model"
    assert not workdir.tokens.exists()


def test_the_api_refuses_another_projects_tokens_and_lists_its_own(
    job: PublishedJob, tmp_path: Path
) -> None:
    """``POST /v1/jobs`` answers 422 on the field before anything runs; ``GET /v1/models``
    shows the tokens model to its owner only."""
    settings = sqlite_settings(tmp_path, job.tracking_uri)
    with open_store(settings) as store:
        acme = {"Authorization": f"Bearer {store.create_api_key(PROJECT)}"}
        globex = {"Authorization": f"Bearer {store.create_api_key('globex')}"}
    body = naming(tiny_spec(job.root / "teacher.pt"), f"models:/{TOKENS_MODEL}@candidate")
    with TestClient(create_app(settings)) as http:
        refused = http.post("/v1/jobs", json=body.model_dump(mode="json"), headers=globex)
        listed = http.get("/v1/models", headers=acme).json()
        hidden = http.get("/v1/models", headers=globex).json()
        downloaded = http.get(f"/v1/models/{TOKENS_MODEL}/versions/1/weights", headers=acme)
    assert refused.status_code == 422, refused.text
    (problem,) = refused.json()["detail"]
    assert problem["loc"] == ["body", "stage1", "from_model"]
    assert "does not name a registered tokens version of project 'globex'" in problem["msg"]
    assert TOKENS_MODEL in {model["name"] for model in listed["data"]}
    assert hidden["count"] == 0
    assert downloaded.status_code == 200
    assert job.result.tokens_path is not None
    assert downloaded.content == job.result.tokens_path.read_bytes()


def test_the_student_pyfunc_carries_its_code_and_requirements_not_maskd(
    job: PublishedJob, tmp_path: Path
) -> None:
    """What lets it load where maskd is not installed (``.ci/pyfunc-check`` proves that in a
    fresh environment): ``maskd_core``'s source in the model, and pinned requirements that
    name torch and torchvision but not maskd."""
    import torchvision

    mlflow.set_tracking_uri(job.tracking_uri)
    model = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=job.links["model"]["uri"], dst_path=str(tmp_path)
        )
    )
    requirements = (model / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert f"torchvision=={torchvision.__version__.split('+')[0]}" in requirements
    assert not any(line.startswith("maskd") for line in requirements)
    assert (model / "code" / "maskd_core" / "models" / "__init__.py").is_file()
    assert not list(model.rglob("__pycache__"))


def test_reuse_by_fingerprint_reads_the_job_store_whatever_mlflow_points_at(
    job: PublishedJob, tmp_path: Path
) -> None:
    """The learned tokens are also a logged model, so MLflow 3 serves the run's file from
    ``models:/<id>`` through a client of the process-wide URI. A fresh worker has never set
    it: reuse must still read the job's own store, not a registry MLflow opens by default."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(f"sqlite:///{elsewhere / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{elsewhere / 'mlflow.db'}")
    try:
        workdir = WorkDir(tmp_path / "job")
        reused = reuse_stage1_tokens(job.tracking_uri, PROJECT, job.spec, workdir)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert reused is not None and workdir.tokens.is_file()
    assert not (elsewhere / "mlflow.db").exists()
