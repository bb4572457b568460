"""MLflow tracking, registration and stage-1 reuse against a real MLflow (no mocks).

One SQLite-backed MLflow per module (creating its schema takes seconds), two tiny real jobs run
through ``maskd_core.runner.run_job`` with the tracker as callback, and one test against a
tracking server started on loopback the way ``maskd mlflow`` starts it.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.entities.model_registry import ModelVersion
from tracking_testkit import (
    PROJECT,
    run_through_the_worker,
    save_random_teacher,
    sqlite_settings,
    tiny_spec,
)

from maskd_cli.mlflow_command import mlflow_server_command
from maskd_core.callbacks import STAGE2
from maskd_core.errors import SpecError
from maskd_core.files import file_sha256
from maskd_core.models import build_model
from maskd_core.runner import JobResult, StudentRun, run_job
from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir
from service.lifecycle import JobState
from service.mlflow_names import (
    FAILURE_TAG,
    FINGERPRINT_TAG,
    PAIRING_ARTIFACT,
    PAIRING_TAG,
    PROJECT_TAG,
    REUSED_FROM_JOB_TAG,
    STUDENT_MODEL_NAME,
    VERSION_JOB_ID_TAG,
    VERSION_METHOD_TAG,
    VERSION_SEED_TAG,
    WEIGHTS_SHA256_TAG,
    experiment_name,
    registered_model_name,
)
from service.model_registry import ModelRegistry
from service.model_uris import resolve_registry_weights
from workers.mlflow_tracker import MlflowTracker
from workers.publishing import (
    RegisteredVersion,
    _find_or_create_version,
    log_student_model,
    publish,
    register_student,
)
from workers.token_reuse import reuse_stage1_tokens, stage1_fingerprint
from workers.tracking import job_tracker

torch.set_num_threads(1)

# Real jobs trained and tracked end to end, and an MLflow server subprocess.
pytestmark = pytest.mark.slow


@dataclass
class TrackedJob:
    tracking_uri: str
    root: Path
    spec: JobSpec
    workdir: Path
    tracker: MlflowTracker
    version: RegisteredVersion
    result: JobResult

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.metrics


def run_tracked(
    tracking_uri: str, root: Path, spec: JobSpec, job_id: str, **tracker_args: Any
) -> tuple[MlflowTracker, RegisteredVersion, JobResult, Path]:
    """What the worker does: reuse, run with the tracker, register, finish."""
    workdir = root / "jobs" / job_id
    reused = reuse_stage1_tokens(tracking_uri, PROJECT, spec, WorkDir(workdir))
    tracker = job_tracker(tracking_uri, PROJECT, job_id, spec, root / "mlartifacts", **tracker_args)
    if reused is not None:
        tracker.mark_stage1_reused(reused)
    result = run_job(spec, workdir, callbacks=[tracker])
    version = register_student(
        tracking_uri,
        tracker.run_id,
        PROJECT,
        result.runs[0],
        result.plan.num_classes,
        result.input_example,
    )
    tracker.finish()
    return tracker, version, result, workdir


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> TrackedJob:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = tiny_spec(save_random_teacher(root))
    tracker, version, result, workdir = run_tracked(
        uri, root, spec, "job-1", max_points_per_curve=2
    )
    return TrackedJob(uri, root, spec, workdir, tracker, version, result)


def test_parent_and_stage_runs_with_tags_params_and_curves(job: TrackedJob) -> None:
    client = MlflowClient(job.tracking_uri)
    parent = client.get_run(job.tracker.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["job_id"] == "job-1"
    assert parent.data.tags[PROJECT_TAG] == PROJECT
    assert parent.data.tags["teacher"] == "seg_tiny_teacher"
    assert parent.data.tags["student"] == "seg_tiny_student"
    assert parent.data.tags["method"] == "maskd"
    assert parent.data.params["stage1.optimizer.lr"] == "0.1"
    assert parent.data.params["teacher.layers"] == '["head"]'
    assert {"teacher_miou", "student_miou"} <= set(parent.data.metrics)

    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    by_stage = {run.data.tags["stage"]: run for run in children}
    assert set(by_stage) == {"stage1", "stage2"}
    assert all(run.info.status == "FINISHED" for run in children)

    # 3 steps with at most 2 points per curve: every 2nd step, plus the last one.
    dice = client.get_metric_history(by_stage["stage1"].info.run_id, "dice")
    assert [m.step for m in dice] == [2, 3]
    kd = client.get_metric_history(by_stage["stage2"].info.run_id, "kd_loss")
    assert [m.step for m in kd] == [2, 4]
    assert {"task_loss", "lr", "images_per_sec"} <= set(by_stage["stage2"].data.metrics)

    # The mask grid at the end of stage 1 (1 level: one image of its 2 tokens), and the tokens.
    stage1 = by_stage["stage1"].info.run_id
    images = [f.path for f in client.list_artifacts(stage1, "images")]
    assert any("masks~level0+step+3+" in path for path in images)
    assert [f.path for f in client.list_artifacts(stage1, "tokens")] == ["tokens/tokens.pt"]
    assert by_stage["stage1"].data.tags[FINGERPRINT_TAG] == stage1_fingerprint(job.spec)


def test_artifacts_go_under_the_given_root_not_mlruns(job: TrackedJob) -> None:
    experiment = MlflowClient(job.tracking_uri).get_experiment_by_name(experiment_name(PROJECT))
    assert experiment is not None
    assert experiment.artifact_location.startswith((job.root / "mlartifacts").as_uri())
    assert not Path("mlruns").exists()


def test_registered_version_has_lineage_and_candidate_alias(job: TrackedJob) -> None:
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    assert job.version.name == f"{PROJECT}.tiny-student"
    model = client.get_registered_model(job.version.name)
    assert model.tags[PROJECT_TAG] == PROJECT
    assert str(model.aliases["candidate"]) == job.version.version
    version = client.get_model_version(job.version.name, job.version.version)
    assert version.run_id == job.tracker.run_id
    assert version.tags["maskd.job_id"] == "job-1"
    assert version.tags["maskd.teacher.arch"] == "seg_tiny_teacher"
    teacher_sha = version.tags["maskd.teacher.weights_sha256"]
    assert len(teacher_sha) == 64
    assert version.tags[FINGERPRINT_TAG] == stage1_fingerprint(job.spec)
    logged = client.get_logged_model(str(version.source).removeprefix("models:/"))
    metrics = {metric.key: metric.value for metric in logged.metrics or []}
    assert metrics["student_miou"] == pytest.approx(job.metrics["student_miou"])


def test_pyfunc_student_matches_the_trained_student(job: TrackedJob) -> None:
    student = build_model(
        job.spec.student.model_copy(update={"weights": str(job.workdir / "student.pt")}), 5
    ).eval()
    mlflow.set_tracking_uri(job.tracking_uri)
    loaded = mlflow.pyfunc.load_model(job.version.uri)
    (input_spec,) = loaded.metadata.get_input_schema().inputs
    assert input_spec.shape == (-1, 3, -1, -1)
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32, generator=generator)
        with torch.no_grad():
            expected = student(images)["out"].numpy()
        predicted = loaded.predict(images.numpy())
        assert predicted.shape == (batch, 5, 32, 32)
        np.testing.assert_allclose(predicted, expected, atol=1e-5)


def test_second_job_with_the_same_teacher_reuses_stage1(job: TrackedJob) -> None:
    # Another student and stage 2, same teacher, data, seed and stage 1: reused.
    spec = tiny_spec(
        job.root / "teacher.pt",
        name="tiny-wider",
        student={
            "arch": "seg_tiny_student",
            "args": {"base_channels": 8, "context_blocks": 0},
            "layers": ["head"],
        },
        stage2={"iterations": 2},
    )
    tracker, version, _, workdir = run_tracked(job.tracking_uri, job.root, spec, "job-2")
    client = MlflowClient(job.tracking_uri)
    parent = client.get_run(tracker.run_id)
    assert parent.data.tags[REUSED_FROM_JOB_TAG] == "job-1"
    stages = {
        run.data.tags["stage"]
        for run in client.search_runs(
            [parent.info.experiment_id],
            filter_string="tags.job_id = 'job-2' and tags.stage != 'job'",
        )
    }
    assert stages == {"stage2"}
    assert (workdir / "tokens.pt").read_bytes() == (job.workdir / "tokens.pt").read_bytes()
    registered = client.get_model_version(version.name, version.version)
    assert registered.tags[REUSED_FROM_JOB_TAG] == "job-1"


def test_reuse_needs_same_fingerprint_project_and_consent(job: TrackedJob, tmp_path: Path) -> None:
    uri, weights = job.tracking_uri, job.root / "teacher.pt"
    assert (
        reuse_stage1_tokens(uri, PROJECT, tiny_spec(weights), WorkDir(tmp_path / "a")) is not None
    )
    assert reuse_stage1_tokens(uri, "other", tiny_spec(weights), WorkDir(tmp_path / "b")) is None
    assert (
        reuse_stage1_tokens(uri, PROJECT, tiny_spec(weights, seed=1), WorkDir(tmp_path / "c"))
        is None
    )
    relearn = tiny_spec(weights, stage1={"tokens": 2, "iterations": 3, "reuse": False})
    assert stage1_fingerprint(relearn) == stage1_fingerprint(tiny_spec(weights))
    assert reuse_stage1_tokens(uri, PROJECT, relearn, WorkDir(tmp_path / "d")) is None
    assert not (tmp_path / "d" / "tokens.pt").exists()


def test_registry_weights_resolve_for_the_owner_only(job: TrackedJob, tmp_path: Path) -> None:
    source = tiny_spec(job.root / "teacher.pt")
    as_teacher = source.model_copy(
        update={
            "teacher": source.student.model_copy(
                update={"weights": f"models:/{job.version.name}@candidate"}
            )
        }
    )
    resolved = resolve_registry_weights(as_teacher, PROJECT, job.tracking_uri, tmp_path)
    assert resolved.teacher.weights is not None
    path = Path(resolved.teacher.weights)
    assert path.is_relative_to(tmp_path)
    assert path.read_bytes() == (job.workdir / "student.pt").read_bytes()
    assert as_teacher.teacher.weights == f"models:/{job.version.name}@candidate"

    with pytest.raises(SpecError, match="does not name a registered model") as denied:
        resolve_registry_weights(as_teacher, "other", job.tracking_uri, tmp_path)
    assert denied.value.field == "teacher.weights"
    wrong_arch = as_teacher.model_copy(
        update={"teacher": as_teacher.teacher.model_copy(update={"arch": "seg_tiny_teacher"})}
    )
    with pytest.raises(SpecError, match="seg_tiny_student"):
        resolve_registry_weights(wrong_arch, PROJECT, job.tracking_uri, tmp_path)
    bad = as_teacher.model_copy(
        update={"teacher": as_teacher.teacher.model_copy(update={"weights": "models:/x"})}
    )
    with pytest.raises(SpecError, match="models:/NAME@ALIAS"):
        resolve_registry_weights(bad, PROJECT, job.tracking_uri, tmp_path)


def test_a_redelivered_job_continues_its_runs(job: TrackedJob) -> None:
    again = job_tracker(job.tracking_uri, PROJECT, "job-1", job.spec, job.root / "mlartifacts")
    assert again.run_id == job.tracker.run_id
    again.finish()


def _versions_of_job(client: MlflowClient, job_id: str) -> list[ModelVersion]:
    return list(client.search_model_versions(f"tags.`{VERSION_JOB_ID_TAG}` = '{job_id}'"))


def test_publishing_a_job_again_keeps_its_one_version(job: TrackedJob) -> None:
    """The retry of an attempt killed after registering, before SUCCEEDED, publishes again."""
    links = [publish(job.result, job.tracker, job.tracking_uri) for _ in range(2)]
    expected = {"name": job.version.name, "version": job.version.version, "uri": job.version.uri}
    assert [link["model"] for link in links] == [expected, expected]
    # The pairing was logged when the job planned it (``MlflowTracker.on_plan``), not here.
    assert "pairing" not in links[0]
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    assert [str(v.version) for v in _versions_of_job(client, "job-1")] == [job.version.version]
    run = client.get_run(job.tracker.run_id)
    assert run.data.tags[PAIRING_TAG] == job.result.plan.pairing_line()
    logged_pairing = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{PAIRING_ARTIFACT}")
    assert logged_pairing == job.result.plan.pairing()
    logged = client.search_logged_models(
        [job.tracker.experiment_id], filter_string=f"source_run_id = '{job.tracker.run_id}'"
    )
    assert len(logged) == 1


def _runs_of_a_crashed_job(job: TrackedJob, job_id: str) -> tuple[MlflowTracker, StudentRun]:
    """The runs of a job whose attempt died while registering, and its student: job-1's
    weights under a name of its own, so the registered model and its alias are its own."""
    mlflow.set_tracking_uri(job.tracking_uri)
    spec = job.spec.model_copy(update={"name": job_id})
    tracker = job_tracker(job.tracking_uri, PROJECT, job_id, spec, job.root / "mlartifacts")
    return tracker, StudentRun(spec, STAGE2, WorkDir(job.workdir), job.result.runs[0].summary)


def test_a_version_made_before_the_crash_gets_its_tags_and_alias(job: TrackedJob) -> None:
    """The first attempt died after creating the version, before its alias; the version has
    only its identity tags (made by another client): the retry completes that version."""
    tracker, student = _runs_of_a_crashed_job(job, "job-crashed-after-version")
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    name = registered_model_name(PROJECT, student.spec.name)
    client.create_registered_model(name, tags={PROJECT_TAG: PROJECT})
    logged = log_student_model(client, tracker.experiment_id, tracker.run_id, student, 5, None)
    identity = {
        VERSION_JOB_ID_TAG: "job-crashed-after-version",
        VERSION_METHOD_TAG: student.method.name,
        VERSION_SEED_TAG: str(student.seed),
    }
    made = client.create_model_version(
        name, f"models:/{logged.model_id}", tracker.run_id, tags=identity, model_id=logged.model_id
    )

    version = register_student(job.tracking_uri, tracker.run_id, PROJECT, student, 5, None)
    tracker.finish()

    assert version.version == str(made.version)
    versions = _versions_of_job(client, "job-crashed-after-version")
    assert [str(v.version) for v in versions] == [version.version]
    tags = client.get_model_version(name, version.version).tags
    assert tags[WEIGHTS_SHA256_TAG] == file_sha256(job.workdir / "student.pt")
    assert tags["maskd.teacher.arch"] == "seg_tiny_teacher"
    assert str(client.get_registered_model(name).aliases["candidate"]) == version.version


def test_a_model_logged_before_the_crash_is_registered_once(job: TrackedJob) -> None:
    """One attempt died while logging the model (left PENDING), the next one after logging it
    and before registering it: the third registers that complete model, once, logging none."""
    tracker, student = _runs_of_a_crashed_job(job, "job-crashed-after-logging")
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    client.create_logged_model(
        tracker.experiment_id,
        name=STUDENT_MODEL_NAME,
        source_run_id=tracker.run_id,
        tags={WEIGHTS_SHA256_TAG: file_sha256(job.workdir / "student.pt")},
    )
    logged = log_student_model(client, tracker.experiment_id, tracker.run_id, student, 5, None)

    version = register_student(job.tracking_uri, tracker.run_id, PROJECT, student, 5, None)
    tracker.finish()

    versions = _versions_of_job(client, "job-crashed-after-logging")
    assert [str(v.version) for v in versions] == [version.version]
    assert versions[0].source == f"models:/{logged.model_id}"
    models = client.search_logged_models(
        [tracker.experiment_id], filter_string=f"source_run_id = '{tracker.run_id}'"
    )
    assert len(models) == 2


def test_two_registrars_at_once_keep_the_first_version(job: TrackedJob) -> None:
    """A worker that lost its lease while registering, and the one that took the job over,
    both find no version and create one: both end with the first, the other one deleted."""
    tracker, student = _runs_of_a_crashed_job(job, "job-registered-twice-at-once")
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    name = registered_model_name(PROJECT, student.spec.name)
    client.create_registered_model(name, tags={PROJECT_TAG: PROJECT})
    identity = {
        VERSION_JOB_ID_TAG: "job-registered-twice-at-once",
        VERSION_METHOD_TAG: student.method.name,
        VERSION_SEED_TAG: str(student.seed),
    }
    first: list[RegisteredVersion] = []

    def log_while_the_other_registers() -> LoggedModel:
        logged = log_student_model(client, tracker.experiment_id, tracker.run_id, student, 5, None)
        first.append(register_student(job.tracking_uri, tracker.run_id, PROJECT, student, 5, None))
        return logged

    ours = _find_or_create_version(client, name, identity, log_while_the_other_registers)
    tracker.finish()

    assert [str(ours.version)] == [version.version for version in first]
    versions = _versions_of_job(client, "job-registered-twice-at-once")
    assert [str(v.version) for v in versions] == [first[0].version]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = _free_port()
    artifacts = tmp_path / "served"
    argv, env = mlflow_server_command(
        f"sqlite:///{tmp_path / 'server.db'}", str(artifacts), port=port
    )
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "server.log").read_text()) from None
                time.sleep(0.5)
        yield url, artifacts
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_tracking_over_the_server_serves_artifacts(
    job: TrackedJob, mlflow_server: tuple[str, Path], tmp_path: Path
) -> None:
    url, artifacts = mlflow_server
    tracker = job_tracker(url, PROJECT, "job-http", job.spec, tmp_path / "unused")
    tracker.on_stage_start(STAGE2, 0, 2, job.spec)
    tracker.on_step(STAGE2, 1, {"kd_loss": 0.5})
    tracker.on_masks(STAGE2, 1, {"level0/token0": np.zeros((8, 8, 3), np.uint8)})
    tracker.on_stage_end(STAGE2, 1, {})
    student = StudentRun(job.spec, STAGE2, WorkDir(job.workdir), {"metrics": {"student_miou": 0.5}})
    version = register_student(url, tracker.run_id, PROJECT, student, 5, None)
    tracker.finish()

    assert not (tmp_path / "unused").exists()
    assert any(path.name == "student.pt" for path in artifacts.rglob("*"))
    assert any(path.name.endswith(".png") for path in artifacts.rglob("*"))
    weights = ModelRegistry(url).download_weights(
        PROJECT, version.name, version.version, tmp_path / "cache"
    )
    assert weights.read_bytes() == (job.workdir / "student.pt").read_bytes()


def test_the_worker_task_tracks_reuses_and_registers(job: TrackedJob, tmp_path: Path) -> None:
    """``maskd.run_job``'s body end to end: the second job of the project reuses stage 1."""
    spec = tiny_spec(job.root / "teacher.pt", name="via-worker", stage2={"iterations": 2})
    record, events_seen = run_through_the_worker(sqlite_settings(tmp_path, job.tracking_uri), spec)
    events = [event.message for event in events_seen]
    assert "stage 1 reused from job job-1" in events
    model = record.outputs["model"]
    assert model["name"] == f"{PROJECT}.via-worker-student"
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    version = client.get_model_version(model["name"], model["version"])
    assert version.tags["maskd.job_id"] == record.id
    assert version.tags[REUSED_FROM_JOB_TAG] == "job-1"
    run = client.get_run(record.outputs["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["name"] == "via-worker"


def test_a_comparison_job_tracks_registers_and_records_every_run(
    job: TrackedJob, tmp_path: Path
) -> None:
    """Two methods × two seeds through ``maskd.run_job``'s body: one stage-1 run, four student
    runs under the parent, four registered versions and the table in the job outputs."""
    spec = tiny_spec(
        job.root / "teacher.pt",
        name="compare",
        stage1={"tokens": 2, "iterations": 2},  # not job-1's stage 1: this one runs it
        stage2={"iterations": 2},
        comparison={"methods": ["maskd", "fitnet"], "seeds": [0, 1]},
    )
    record, _ = run_through_the_worker(sqlite_settings(tmp_path, job.tracking_uri), spec)
    assert record is not None and record.state is JobState.SUCCEEDED

    table = record.outputs["comparison"]
    assert [row["method"] for row in table["methods"]] == ["maskd", "fitnet"]
    assert record.outputs["metrics"]["fitnet_miou_mean"] == table["methods"][1]["mean"]

    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    parent_id = record.outputs["mlflow"]["run_id"]
    children = client.search_runs(
        [record.outputs["mlflow"]["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    stages = sorted(run.data.tags["stage"] for run in children)
    assert stages == [
        "stage1",
        "stage2/fitnet/seed0",
        "stage2/fitnet/seed1",
        "stage2/maskd/seed0",
        "stage2/maskd/seed1",
    ]
    students = {
        (run.data.tags["method"], run.data.tags["seed"]): run
        for run in children
        if run.data.tags["stage"] != "stage1"
    }
    assert set(students) == {(m, s) for m in ("maskd", "fitnet") for s in ("0", "1")}
    assert all(run.info.status == "FINISHED" for run in children)
    assert "student_miou" in students["fitnet", "1"].data.metrics
    # Each run logs its own method, params and seed, not the job's.
    for (method, seed), run in students.items():
        assert run.data.params["stage2.method.name"] == method
        assert run.data.params["seed"] == seed
    assert students["fitnet", "0"].data.params["stage2.method.params"] == "{}"
    assert students["maskd", "0"].data.params["stage2.method.params.custom_mask"] == "false"

    parent = client.get_run(parent_id)
    assert parent.data.metrics["maskd_miou_mean"] == pytest.approx(table["methods"][0]["mean"])
    assert "maskd_miou_std" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"comparison.json", "comparison.md"} <= artifacts

    models = record.outputs["models"]
    assert len(models) == 4 and len({m["version"] for m in models}) == 4
    for model in models:
        version = client.get_model_version(model["name"], model["version"])
        assert version.tags["maskd.method"] == model["method"]
        assert version.tags["maskd.seed"] == str(model["seed"])
        assert version.run_id == students[model["method"], str(model["seed"])].info.run_id


def test_a_comparison_with_a_diverging_run_succeeds_with_a_partial_table(
    job: TrackedJob, tmp_path: Path
) -> None:
    """One (method, seed) diverges: its row says why, its MLflow run ends FAILED with the
    reason, an event names it, nothing of it is registered, and the job still SUCCEEDS."""
    diverging = {"name": "fitnet", "params": {"weight": 1e30}}
    spec = tiny_spec(
        job.root / "teacher.pt",
        name="compare-partial",
        stage2={"iterations": 2},
        comparison={"methods": ["none", diverging], "seeds": [0]},
    )
    record, events = run_through_the_worker(sqlite_settings(tmp_path, job.tracking_uri), spec)
    assert record is not None and record.state is JobState.SUCCEEDED
    assert (record.message or "").startswith(
        "succeeded with 1 of 2 comparison runs failed (stage2/fitnet/seed0;"
    )
    none, fitnet = record.outputs["comparison"]["methods"]
    assert none["mean"] == record.outputs["metrics"]["none_miou_mean"]
    assert fitnet["mean"] is None and fitnet["params"] == {"weight": 1e30}
    (failure,) = fitnet["failed"]
    assert failure["reason"].startswith("training diverged at stage2/fitnet/seed0 step 2")
    (failed_event,) = [event for event in events if event.kind == "error"]
    assert failed_event.message == (
        f"stage2/fitnet/seed0 failed, the comparison goes on without it: {failure['reason']}"
    )
    assert [(m["method"], m["seed"]) for m in record.outputs["models"]] == [("none", 0)]

    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    children = client.search_runs(
        [record.outputs["mlflow"]["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{record.outputs['mlflow']['run_id']}'",
    )
    by_stage = {run.data.tags["stage"]: run for run in children}
    assert by_stage["stage2/none/seed0"].info.status == "FINISHED"
    failed_run = by_stage["stage2/fitnet/seed0"]
    assert failed_run.info.status == "FAILED"
    assert failed_run.data.tags[FAILURE_TAG] == failure["reason"]
    assert client.get_run(record.outputs["mlflow"]["run_id"]).info.status == "FINISHED"


def test_publishing_a_comparison_again_keeps_one_version_per_student(
    job: TrackedJob, tmp_path: Path
) -> None:
    """The retry of a comparison killed after registering publishes every student again."""
    spec = tiny_spec(
        job.root / "teacher.pt",
        name="compare-again",
        stage1={"tokens": 2, "iterations": 2},
        stage2={"iterations": 2},
        comparison={"methods": ["maskd", "fitnet"], "seeds": [0, 1]},
    )
    tracker = job_tracker(
        job.tracking_uri, PROJECT, "job-compare-again", spec, job.root / "mlartifacts"
    )
    result = run_job(spec, tmp_path / "job", callbacks=[tracker])
    first = publish(result, tracker, job.tracking_uri)
    again = publish(result, tracker, job.tracking_uri)
    tracker.finish()

    assert again == first
    client = MlflowClient(job.tracking_uri, registry_uri=job.tracking_uri)
    versions = _versions_of_job(client, "job-compare-again")
    students = sorted((v.tags["maskd.method"], v.tags["maskd.seed"]) for v in versions)
    assert students == sorted((m, s) for m in ("maskd", "fitnet") for s in ("0", "1"))
    assert sorted(str(v.version) for v in versions) == sorted(m["version"] for m in first["models"])
