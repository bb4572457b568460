"""What MLflow's UI shows of a comparison job, checked in a real MLflow store (SQLite, no mocks).

The experiment is a model-training one, every comparison run holds its student metric as a
curve under one key (so the chart view overlays the methods), the stage-1 run holds one mask
grid per level, and the stage runs carry the machine's system metrics.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from PIL import Image

from maskd_core.models import build_model
from maskd_core.runner import JobResult, run_job
from maskd_core.spec import JobSpec
from service.mlflow_names import (
    EXPERIMENT_KIND_TAG,
    PROJECT_TAG,
    TRAINING_EXPERIMENT_KIND,
)
from workers.mlflow_tracker import MlflowTracker, get_or_create_experiment
from workers.tracking import job_tracker

torch.set_num_threads(1)

pytestmark = pytest.mark.slow

PROJECT = "acme"
METHODS = ("maskd", "none")
STAGE2_STEPS = 24
EVAL_EVERY = 8


@dataclass
class ComparisonRuns:
    client: MlflowClient
    tracker: MlflowTracker
    result: JobResult
    by_stage: dict[str, Run]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> ComparisonRuns:
    root = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    body: dict[str, Any] = {
        "name": "ui",
        "teacher": {
            "arch": "seg_tiny_teacher",
            "args": {"base_channels": 8, "context_blocks": 1},
            "weights": str(root / "teacher.pt"),
            "layers": ["backbone", "head"],
        },
        "student": {
            "arch": "seg_tiny_student",
            "args": {"base_channels": 4, "context_blocks": 0},
            "layers": ["backbone", "head"],
        },
        "dataset": {"args": {"num_samples": 12, "image_size": 32}},
        "stage1": {"tokens": 3, "iterations": 2},
        "stage2": {"iterations": STAGE2_STEPS},
        "comparison": {"methods": list(METHODS), "seeds": [0]},
        "eval_every": EVAL_EVERY,
        "batch_size": 4,
        "device": "cpu",
        "checkpoint_every": 100,
    }
    spec = JobSpec.model_validate(body)
    teacher = build_model(spec.teacher.model_copy(update={"weights": None}), 5)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    tracker = job_tracker(
        uri, PROJECT, "job-ui", spec, root / "mlartifacts", system_metrics_interval_seconds=0.05
    )
    result = run_job(spec, root / "job", callbacks=[tracker])
    tracker.finish()
    client = MlflowClient(uri)
    children = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.run_id}'"
    )
    return ComparisonRuns(
        client, tracker, result, {run.data.tags["stage"]: run for run in children}
    )


def test_the_experiment_is_a_model_training_one(comparison: ComparisonRuns) -> None:
    experiment = comparison.client.get_experiment(comparison.tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND


def test_an_experiment_made_before_the_kind_gets_it_when_reused(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    old = client.create_experiment(
        "maskd/old", artifact_location=tmp_path.as_uri(), tags={PROJECT_TAG: "old"}
    )
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert get_or_create_experiment(client, "maskd/old", None, "old") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND


def test_each_method_logs_its_student_metric_as_a_curve_under_one_key(
    comparison: ComparisonRuns,
) -> None:
    steps = list(range(EVAL_EVERY, STAGE2_STEPS + 1, EVAL_EVERY))
    for method, run in zip(METHODS, comparison.result.runs, strict=True):
        mlflow_run = comparison.by_stage[f"stage2/{method}/seed0"]
        history = comparison.client.get_metric_history(mlflow_run.info.run_id, "student_miou")
        assert [point.step for point in history] == steps
        # The curve ends on the run's final value, the one its summary and the table hold.
        assert history[-1].value == pytest.approx(run.metrics["student_miou"])
        assert mlflow_run.data.metrics["student_miou"] == pytest.approx(history[-1].value)


def test_the_stage1_run_holds_one_mask_grid_per_level_beside_the_masked_teacher_check(
    comparison: ComparisonRuns, tmp_path: Path
) -> None:
    stage1 = comparison.by_stage["stage1"]
    run_id = stage1.info.run_id
    images = [f.path for f in comparison.client.list_artifacts(run_id, "images")]
    grids = sorted(path for path in images if path.endswith(".png") and "masks~" in path)
    assert [path.split("/")[-1].split("+")[0] for path in grids] == [
        "masks~level0",
        "masks~level1",
    ]
    assert not any("token" in path for path in images)
    picture = comparison.client.download_artifacts(run_id, grids[0], str(tmp_path))
    grid = np.asarray(Image.open(picture))
    # The input and 3 tokens side by side: wider than three cells of the 128-pixel layout.
    assert grid.shape[1] > 3 * 128 and grid.shape[0] > 128
    assert "masked_teacher_miou" in stage1.data.metrics


def test_the_stage_runs_carry_system_metrics(comparison: ComparisonRuns) -> None:
    for stage in ("stage1", "stage2/maskd/seed0", "stage2/none/seed0"):
        metrics = comparison.by_stage[stage].data.metrics
        assert "system/cpu_utilization_percentage" in metrics, (stage, sorted(metrics))
        assert "system/system_memory_usage_megabytes" in metrics
