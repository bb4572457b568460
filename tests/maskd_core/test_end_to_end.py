"""Both stages on the procedural data with the registered tiny models, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from maskd_core.callbacks import Callback, Stage
from maskd_core.errors import JobCancelled
from maskd_core.runner import run_job, train_teacher
from maskd_core.spec import JobSpec


class Events(Callback):
    def __init__(self, stop_in: str | None = None, stop_at: int = 0) -> None:
        self.events: list[tuple[str, str, int]] = []
        self.artifacts: dict[str, Path] = {}
        self.masks: dict[str, Any] = {}
        self.stop_in, self.stop_at = stop_in, stop_at
        self.stage, self.step = "", 0

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        self.events.append(("start", str(stage), start_step))
        self.stage, self.step = str(stage), start_step

    def on_step(self, stage: Stage, step: int, metrics: Any) -> None:
        self.step = step

    def on_masks(self, stage: Stage, step: int, images: Any) -> None:
        self.masks.update(images)

    def on_artifact(self, stage: Stage, name: str, path: Path) -> None:
        self.artifacts[name] = path

    def should_stop(self) -> bool:
        return self.stage == self.stop_in and self.step >= self.stop_at


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> JobSpec:
    teacher = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    data: dict[str, Any] = {
        "teacher": {
            "arch": "seg_tiny_teacher",
            "args": {"base_channels": 8, "context_blocks": 1},
            "layers": ["backbone", "head"],
            "weights": str(teacher),
        },
        "student": {
            "arch": "seg_tiny_student",
            "args": {"base_channels": 4},
            "layers": ["backbone", "head"],
        },
        "dataset": {"name": "procedural_shapes", "args": {"num_samples": 12, "image_size": 32}},
        "stage1": {"iterations": 3, "mask_weighting": True},
        "stage2": {"iterations": 4, "custom_mask": True, "custom_mask_warmup": 2},
        "device": "cpu",
        "batch_size": 2,
        "checkpoint_every": 2,
    }
    spec = JobSpec.model_validate(data)
    metrics = train_teacher(spec, teacher, iterations=4)
    assert teacher.is_file() and not teacher.with_name("teacher.pt.ckpt").exists()
    assert "teacher_miou" in metrics
    return spec


def test_run_job_writes_tokens_student_and_summary(spec: JobSpec, tmp_path: Path) -> None:
    events = Events()
    result = run_job(spec, tmp_path, [events], baseline=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in ("teacher", "masked_teacher", "student", "baseline"):
        assert 0.0 <= summary["metrics"][f"{name}_miou"] <= 1.0
    assert summary == result.runs[0].summary | {"plan": summary["plan"]}
    assert set(events.artifacts) == {"tokens", "student", "summary"}
    # One grid per level (two tapped layers), each the input and its 8 tokens in one picture.
    assert set(events.masks) == {"level0", "level1"}
    assert all(grid.dtype.name == "uint8" and grid.ndim == 3 for grid in events.masks.values())
    tokens = torch.load(result.tokens_path, weights_only=True)
    assert tokens["format"] == "maskd-tokens/1" and tokens["mask_weighting"] is True
    assert [lv["channels"] for lv in tokens["levels"]] == [32, 5]
    assert len(tokens["teacher"]["weights_sha256"]) == 64
    state = torch.load(result.runs[0].workdir.student, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_a_cancelled_job_resumes_in_its_stage_and_matches_an_uninterrupted_one(
    spec: JobSpec, tmp_path: Path
) -> None:
    straight = run_job(spec, tmp_path / "straight")
    with pytest.raises(JobCancelled) as err:
        run_job(spec, tmp_path / "resumed", Events(stop_in="stage2", stop_at=2))
    assert (err.value.stage, err.value.step) == ("stage2", 2)
    events = Events()
    resumed = run_job(spec, tmp_path / "resumed", events)
    assert [e for e in events.events if e[0] == "start"] == [("start", "stage2", 2)]
    a = torch.load(straight.runs[0].workdir.student, weights_only=True)
    b = torch.load(resumed.runs[0].workdir.student, weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
