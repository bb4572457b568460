"""``execute_job`` in process: what a delivery does before any work, and how an attempt ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from worker_testkit import an_hour_ago, store_on_clock, tiny_spec

from maskd_core.errors import ComparisonFailed, DataError, Setting, TrainingDiverged
from maskd_core.spec import JobSpec
from service.config import Settings
from service.lifecycle import FailureKind, JobState
from service.store import JobStore
from workers.outcomes import MAX_ATTEMPTS, AttemptEnd
from workers.tasks import execute_job


def local_settings(database_url: str, tmp_path: Path) -> Settings:
    """Work directories and MLflow in ``tmp_path``, never in the current folder."""
    return Settings(
        database_url=database_url,
        data_dir=tmp_path,
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )


def test_a_job_whose_workers_keep_dying_is_failed_instead_of_rerun(
    job_store: JobStore, database_url: str, tmp_path: Path
) -> None:
    project = job_store.create_project("p")
    job, _ = job_store.create_job(project.id, JobSpec.model_validate(tiny_spec()))
    clock = an_hour_ago()
    with store_on_clock(database_url, clock) as past:
        for attempt in range(MAX_ATTEMPTS):
            # Each of these workers claims the job and vanishes; its lease ran out long ago.
            assert past.claim(job.id, f"lost-{attempt}", lease_seconds=30) is not None
            clock.advance(60)

    settings = local_settings(database_url, tmp_path)
    outcome = execute_job(job_store, settings, job.id, delivery="redelivered")

    record = job_store.get_job_unscoped(job.id)
    assert record is not None
    assert outcome == "FAILED"
    assert (record.state, record.failure_kind) == (JobState.FAILED, FailureKind.INFRASTRUCTURE)
    assert f"lost {MAX_ATTEMPTS} times" in (record.message or "")
    assert record.lease_owner is None


def test_a_delivery_for_a_finished_job_does_nothing(
    job_store: JobStore, database_url: str, tmp_path: Path
) -> None:
    project = job_store.create_project("p")
    job, _ = job_store.create_job(project.id, JobSpec.model_validate(tiny_spec()))
    job_store.request_cancel(project.id, job.id)

    settings = local_settings(database_url, tmp_path)
    assert execute_job(job_store, settings, job.id, delivery="late") == "skipped"

    record = job_store.get_job_unscoped(job.id)
    assert record is not None
    assert (record.state, record.attempt) == (JobState.CANCELLED, 0)
    assert not (tmp_path / "jobs" / job.id).exists()


DIVERGED = TrainingDiverged(
    "stage2",
    2,
    float("nan"),
    ["task_loss", "kd_loss"],
    lr=Setting("stage2.optimizer.lr", 1e30),
    loss_weight=Setting("stage2.method.params.loss_weight", 1000.0),
    grad_clip=Setting("stage2.optimizer.grad_clip", None),
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (DataError("masks/0003.png cannot be read: not a PNG file"), FailureKind.USER),
        (DIVERGED, FailureKind.TRAINING),
        (ComparisonFailed([("stage2/fitnet/seed0", str(DIVERGED))]), FailureKind.TRAINING),
    ],
)
def test_unreadable_data_fails_as_user_and_a_diverged_loss_as_training(
    job_store: JobStore, database_url: str, tmp_path: Path, error: Exception, kind: FailureKind
) -> None:
    project = job_store.create_project("p")
    job, _ = job_store.create_job(project.id, JobSpec.model_validate(tiny_spec()))
    assert job_store.claim(job.id, "w", lease_seconds=30) is not None
    settings = local_settings(database_url, tmp_path)

    assert AttemptEnd(job_store, settings, job.id, "w").after(error, None) == "FAILED"

    record = job_store.get_job_unscoped(job.id)
    assert record is not None
    assert (record.state, record.failure_kind, record.message) == (
        JobState.FAILED,
        kind,
        str(error),
    )


@pytest.mark.slow
def test_a_job_whose_training_diverges_fails_as_training_naming_lr_and_loss_weight(
    job_store: JobStore, database_url: str, tmp_path: Path
) -> None:
    project = job_store.create_project("p")
    body = tiny_spec(stage2_iterations=4)
    body["stage2"] = {
        **body["stage2"],
        "optimizer": {"lr": 1e30},
        "method": {"name": "maskd", "params": {"loss_weight": 1000.0}},
    }
    job, _ = job_store.create_job(project.id, JobSpec.model_validate(body))
    settings = local_settings(database_url, tmp_path)
    outcome = execute_job(job_store, settings, job.id, delivery="first")

    record = job_store.get_job_unscoped(job.id)
    assert record is not None
    assert outcome == "FAILED"
    assert (record.state, record.failure_kind) == (JobState.FAILED, FailureKind.TRAINING)
    message = record.message or ""
    assert message.startswith("training diverged at stage2 step "), message
    assert "stage2.optimizer.lr = 1e+30" in message
    assert "stage2.method.params.loss_weight = 1000" in message
    assert record.transitions[-1].to_state is JobState.FAILED
    assert record.lease_owner is None


@pytest.mark.slow
def test_a_method_without_tokens_skips_stage_one_end_to_end(
    job_store: JobStore, database_url: str, tmp_path: Path
) -> None:
    """FitNet learns no receptive tokens: the job goes straight to STAGE2 and records no
    tokens file, and stage-1 reuse is not attempted."""
    project = job_store.create_project("p")
    body = tiny_spec(stage2_iterations=2)
    body["stage2"] = {**body["stage2"], "method": "fitnet"}
    job, _ = job_store.create_job(project.id, JobSpec.model_validate(body))
    settings = local_settings(database_url, tmp_path)
    outcome = execute_job(job_store, settings, job.id, delivery="first")

    record = job_store.get_job_unscoped(job.id)
    assert record is not None
    assert outcome == "SUCCEEDED", record.message
    states = [t.to_state for t in record.transitions]
    assert JobState.STAGE1 not in states
    assert states[-3:] == [JobState.STAGE2, JobState.REGISTERING, JobState.SUCCEEDED]
    assert set(record.outputs["files"]) == {"student", "summary"}
    assert not (tmp_path / "jobs" / job.id / "tokens.pt").exists()


@pytest.mark.slow
def test_a_detection_job_runs_through_the_worker_logs_map_and_registers_its_student(
    job_store: JobStore, database_url: str, tmp_path: Path
) -> None:
    model_args = {"backbone": "tiny", "min_size": 64, "max_size": 64}
    spec = JobSpec.model_validate(
        {
            "name": "tiny-detection",
            "task": "detection",
            "teacher": {
                "arch": "fcos",
                "args": {**model_args, "fpn_channels": 32, "tiny_width": 8, "head_convs": 1},
                "layers": ["backbone"],
            },
            "student": {
                "arch": "fcos",
                "args": {**model_args, "fpn_channels": 32, "tiny_width": 8, "head_convs": 1},
                "layers": ["backbone"],
            },
            "dataset": {
                "name": "procedural_boxes",
                "args": {"num_samples": 8, "image_size": 64},
                "val_fraction": 0.25,
            },
            "stage1": {"iterations": 2},
            "stage2": {"iterations": 2, "custom_mask_warmup": 1},
            "batch_size": 2,
            "device": "cpu",
        }
    )
    project = job_store.create_project("p")
    job, _ = job_store.create_job(project.id, spec)
    settings = local_settings(database_url, tmp_path)
    outcome = execute_job(job_store, settings, job.id, delivery="first")

    record = job_store.get_job_unscoped(job.id)
    assert record is not None
    assert outcome == "SUCCEEDED", record.message
    assert {"teacher_map", "student_map"} <= set(record.outputs["metrics"])
    assert record.outputs["model"]["name"] == "p.tiny-detection-student"
    assert (tmp_path / "jobs" / job.id / "tokens.pt").is_file()
