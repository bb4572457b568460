"""``maskd_core.estimate`` against formulas: a convolution's FLOPs, parameter counts, the ETA
as iterations × seconds per step plus evaluations, and what a measured step must contain."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
from torch import nn

from maskd_core.estimate import (
    MAX_MEASURED_STEPS,
    count_parameters,
    estimate_job,
    evaluation_passes,
    forward_flops,
)
from maskd_core.spec import JobSpec
from maskd_core.tasks import Task


class _Images(Task):
    """The smallest task: a batch is one image tensor, the forward is ``model(batch)``."""

    name = "images"
    primary_metric = "none"

    def collate(self, samples: Any) -> Any:
        return torch.stack(list(samples))

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return batch.to(device)

    def batch_size(self, batch: Any) -> int:
        return int(batch.shape[0])

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Any) -> None:
        model(batch)

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device
    ) -> dict[str, float]:
        raise NotImplementedError

    def example_input(self, batch: Any) -> torch.Tensor:
        return torch.as_tensor(batch)


def tiny_spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "name": "estimate",
        "task": "segmentation",
        "teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone"]},
        "student": {"arch": "seg_tiny_student", "layers": ["backbone"]},
        "dataset": {"name": "procedural_shapes"},
        "stage1": {"iterations": 40},
        "stage2": {"iterations": 60},
        "batch_size": 2,
        "device": "cpu",
    }
    body.update(overrides)
    return JobSpec.model_validate(body)


def test_a_convolution_s_flops_are_two_multiply_adds_per_weight_and_output_pixel() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    images = torch.zeros(2, 3, 16, 20)
    # 2 FLOPs (multiply, add) per weight per output pixel, per image.
    expected = 2 * 2 * (8 * 16 * 20) * (3 * 3 * 3)
    assert forward_flops(_Images(), conv, images) == expected


def test_parameters_are_the_sum_of_the_element_counts() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5))
    expected = (8 * 3 * 9 + 8) + (8 + 8) + (8 * 5 + 5)
    assert count_parameters(model) == expected


@pytest.mark.parametrize(
    ("iterations", "eval_every", "passes"),
    [(60, 0, 1), (60, 20, 3), (61, 20, 4), (5, 20, 1)],
)
def test_evaluation_passes_follow_the_loop_s_schedule(
    iterations: int, eval_every: int, passes: int
) -> None:
    assert evaluation_passes(iterations, eval_every) == passes


def test_the_eta_is_iterations_times_the_measured_step_plus_evaluations() -> None:
    estimate = estimate_job(tiny_spec(), steps=2)

    assert [stage.stage for stage in estimate.stages] == ["stage1", "stage2"]
    for stage in estimate.stages:
        assert stage.seconds_per_step > 0 and stage.batch_per_process == 2
        assert stage.seconds == pytest.approx(
            stage.iterations * stage.seconds_per_step + stage.evaluation_seconds
        )
    assert [s.iterations for s in estimate.stages] == [40, 60]
    # Stage 1: the teacher's evaluation and the masked teacher's; stage 2: the student's.
    assert [s.evaluation_passes for s in estimate.stages] == [2, 1]
    assert estimate.total_seconds == pytest.approx(sum(s.seconds for s in estimate.stages))
    assert estimate.measured_on.device == "cpu" and estimate.measured_on.representative
    assert estimate.memory_method == "cpu_sum_of_held_tensors"


def test_the_models_and_steps_are_counted_not_assumed() -> None:
    estimate = estimate_job(
        tiny_spec(comparison={"methods": ["maskd", "none"], "seeds": [0, 1]}), steps=1
    )
    assert estimate.student is not None
    teacher, student = estimate.teacher, estimate.student
    assert teacher.parameters > student.parameters > 0
    assert teacher.forward_flops_per_image > student.forward_flops_per_image > 0
    by_stage = {stage.stage: stage for stage in estimate.stages}
    assert list(by_stage) == [
        "stage1",
        "stage2/maskd/seed0",
        "stage2/maskd/seed1",
        "stage2/none/seed0",
        "stage2/none/seed1",
    ]
    batch = 2
    # Without distillation a step is the student's forward and backward: between 2x and 3x the
    # forward (the first layer computes no gradient for its input), measured.
    plain = by_stage["stage2/none/seed0"].flops_per_step
    assert 2 * batch * student.forward_flops_per_image < plain
    assert plain <= 3 * batch * student.forward_flops_per_image
    # MasKD adds the frozen teacher's forward, and no backward through it.
    maskd = by_stage["stage2/maskd/seed0"].flops_per_step
    assert maskd >= plain + batch * teacher.forward_flops_per_image
    assert maskd < plain + 2 * batch * teacher.forward_flops_per_image
    # Stage 1 runs the teacher forward and back to the tokens, not its weights' gradients.
    stage1 = by_stage["stage1"].flops_per_step
    assert batch * teacher.forward_flops_per_image < stage1
    assert stage1 < 3 * batch * teacher.forward_flops_per_image
    # A CPU's peak holds at least every weight of both models and the batch.
    weights = 4 * (teacher.parameters + student.parameters)
    assert by_stage["stage2/maskd/seed0"].peak_memory_bytes > weights


def test_each_process_of_a_multi_process_job_runs_its_share_of_the_batch() -> None:
    estimate = estimate_job(tiny_spec(batch_size=4, resources={"processes": 2}), steps=1)
    assert estimate.world_size == 2
    assert {stage.batch_per_process for stage in estimate.stages} == {2}


def test_a_spec_without_layers_is_measured_on_the_registry_s_default_taps() -> None:
    estimate = estimate_job(
        tiny_spec(teacher={"arch": "seg_tiny_teacher"}, student={"arch": "seg_tiny_student"}),
        steps=1,
    )
    assert estimate.pairing is not None
    assert estimate.pairing["layers_from"] == {
        "teacher": "registry defaults",
        "student": "registry defaults",
    }
    assert [stage.stage for stage in estimate.stages] == ["stage1", "stage2"]


def test_a_cpu_estimate_of_a_job_for_the_worker_s_device_says_it_may_not_hold() -> None:
    estimate = estimate_job(tiny_spec(device="auto"), steps=1)
    if torch.cuda.is_available():
        pytest.skip("this host measures on CUDA")
    assert not estimate.measured_on.representative
    assert estimate.measured_on.target_device == "auto"
    assert "GPU" in estimate.measured_on.note


def test_a_teacher_job_is_one_supervised_loop() -> None:
    spec = tiny_spec(
        kind="teacher",
        student=None,
        teacher_training={"iterations": 30, "optimizer": {"name": "sgd", "lr": 0.01}},
    )
    estimate = estimate_job(spec, steps=1)
    assert estimate.student is None
    [stage] = estimate.stages
    assert (stage.stage, stage.iterations) == ("teacher", 30)


@pytest.mark.parametrize("steps", [0, MAX_MEASURED_STEPS + 1])
def test_the_measured_steps_are_bounded(steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        estimate_job(tiny_spec(), steps=steps)
