"""A teacher's own recipe (``teacher_training``) and the teacher job kind in the spec.

``maskd train-teacher`` and teacher jobs train with ``teacher_training`` when the spec has it;
``maskd train-teacher`` falls back to stage 2's optimiser otherwise. A job's kind decides which
fields it has: a teacher job has no student or comparison, a distillation job needs a student.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from maskd_cli import main
from maskd_core.callbacks import Callback, Stage
from maskd_core.errors import TrainingDiverged
from maskd_core.runner import run_teacher_job, teacher_recipe, train_teacher
from maskd_core.spec import JobSpec

TEACHER = {"arch": "seg_tiny_teacher", "args": {"base_channels": 4, "context_blocks": 0}}
STUDENT = {"arch": "seg_tiny_student", "args": {"base_channels": 4, "context_blocks": 0}}


def spec_data(**changes: Any) -> dict[str, Any]:
    """A distillation spec that trains in a blink, with a stage-2 optimiser of its own."""
    return {
        "name": "recipe",
        "device": "cpu",
        "teacher": {**TEACHER, "layers": ["head"]},
        "student": {**STUDENT, "layers": ["head"]},
        "dataset": {"args": {"num_samples": 8, "image_size": 16}},
        "stage2": {"iterations": 7, "optimizer": {"name": "sgd", "lr": 0.05}},
        "batch_size": 4,
        "max_eval_batches": 1,
        **changes,
    }


RECIPE = {"iterations": 3, "optimizer": {"name": "adam", "lr": 0.001}}


class StageSteps(Callback):
    """The total steps each stage announced."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        self.totals[str(stage)] = total_steps

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        pass


def test_the_recipe_is_teacher_training_else_stage2_and_iterations_override() -> None:
    own = teacher_recipe(JobSpec.model_validate(spec_data(teacher_training=RECIPE)))
    assert (own.optimizer.name, own.optimizer.lr, own.iterations) == ("adam", 0.001, 3)
    assert own.optimizer_field == "teacher_training.optimizer"
    fallback = teacher_recipe(JobSpec.model_validate(spec_data()), iterations=5)
    assert (fallback.optimizer.name, fallback.optimizer.lr, fallback.iterations) == ("sgd", 0.05, 5)
    assert fallback.optimizer_field == "stage2.optimizer"


def test_train_teacher_trains_with_teacher_training(tmp_path: Path) -> None:
    """Its steps are the recipe's, and a diverging recipe is named as the field to fix, while
    stage 2's optimiser (which would train fine) is not used."""
    steps = StageSteps()
    metrics = train_teacher(
        JobSpec.model_validate(spec_data(teacher_training=RECIPE)), tmp_path / "t.pt", None, steps
    )
    assert steps.totals == {"teacher": 3}
    assert "teacher_miou" in metrics and (tmp_path / "t.pt").is_file()
    diverging = {"iterations": 3, "optimizer": {"name": "sgd", "lr": 1e30}}
    spec = JobSpec.model_validate(spec_data(teacher_training=diverging))
    with pytest.raises(TrainingDiverged, match=r"teacher_training\.optimizer\.lr"):
        train_teacher(spec, tmp_path / "diverged.pt")


def test_maskd_train_teacher_uses_teacher_training_and_the_flag_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec_data(teacher_training=RECIPE)))
    assert main(["train-teacher", str(job), "--out", str(tmp_path / "a.pt")]) == 0
    assert " 3/3 " in capsys.readouterr().err  # the recipe's steps, in the progress bar
    assert (
        main(["train-teacher", str(job), "--out", str(tmp_path / "b.pt"), "--iterations", "2"]) == 0
    )
    assert " 2/2 " in capsys.readouterr().err
    assert torch.load(tmp_path / "b.pt", weights_only=True).keys()


def test_a_teacher_job_runs_and_resumes_from_its_summary(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {
            **{k: v for k, v in spec_data().items() if k not in ("student", "stage2")},
            "kind": "teacher",
            "teacher_training": RECIPE,
        }
    )
    steps = StageSteps()
    result = run_teacher_job(spec, tmp_path, steps)
    assert steps.totals == {"teacher": 3}
    assert result.files == {
        "teacher": tmp_path / "teacher.pt",
        "summary": tmp_path / "summary.json",
    }
    assert result.summary["steps"] == {"teacher": 3}
    again = StageSteps()
    assert run_teacher_job(spec, tmp_path, again).metrics == result.metrics
    assert again.totals == {}  # read back, not trained again


def _errors(data: dict[str, Any]) -> dict[tuple[str | int, ...], str]:
    with pytest.raises(ValidationError) as error:
        JobSpec.model_validate(data)
    return {tuple(e["loc"]): e["msg"] for e in error.value.errors()}


def test_each_kind_refuses_the_fields_it_has_not() -> None:
    teacher_job = {**spec_data(), "kind": "teacher"}
    problems = _errors({**teacher_job, "comparison": {"methods": ["maskd"], "seeds": [0]}})
    assert set(problems) == {("student",), ("comparison",), ("teacher_training",)}
    assert "has no student" in problems[("student",)]
    assert "teacher_training: {iterations: N" in problems[("teacher_training",)]
    missing = _errors({k: v for k, v in spec_data().items() if k != "student"})
    assert "set kind: teacher" in missing[("student",)]
    distill = JobSpec.model_validate(spec_data())
    assert distill.kind == "distill" and [m.name for m in distill.methods()] == ["maskd"]
    teacher = JobSpec.model_validate(
        {k: v for k, v in teacher_job.items() if k != "student"} | {"teacher_training": RECIPE}
    )
    assert teacher.methods() == []  # so it learns no tokens
    assert JobSpec.model_validate_json(teacher.model_dump_json()) == teacher
