"""The detection task: batching, losses, the tapped teacher forward, COCO mAP and both MasKD
stages on real torchvision detectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from maskd_core.data import build_dataset
from maskd_core.loader import split_dataset, train_batches, val_batches
from maskd_core.models import MODELS
from maskd_core.runner import run_job, train_teacher
from maskd_core.spec import JobSpec
from maskd_core.stages import TrainContext, build_aligns, run_stage1, run_stage2
from maskd_core.taps import Taps
from maskd_core.tasks import TASKS
from maskd_core.tasks.detection import DetectionBatch, DetectionTask, coco_map
from maskd_core.tokens import TokenSet
from maskd_core.validate import validate_job

SMALL_DATA = {"num_samples": 8, "image_size": 64, "max_object_size": 24, "vary_size": True}


def tiny_fcos(**args: Any) -> nn.Module:
    torch.manual_seed(0)
    arch_args = {"backbone": "tiny", "min_size": 64, "max_size": 64, "fpn_channels": 32, **args}
    return MODELS.get("fcos")(MODELS.parse_args("fcos", arch_args), 3)


def a_batch(size: int = 2) -> DetectionBatch:
    from maskd_core.data import DATASETS

    dataset = DATASETS.get("procedural_boxes")(
        DATASETS.parse_args("procedural_boxes", SMALL_DATA), 0
    )
    return DetectionTask().collate([dataset[i] for i in range(size)])


def box(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    return [x1, y1, x2, y2]


def truth(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes).reshape(-1, 4), "labels": torch.tensor(labels)}


def found(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, Any]:
    return {**truth(boxes, labels), "scores": torch.tensor(scores)}


# --- batching and the loss --------------------------------------------------------------------


def test_detection_task_is_registered_and_batches_lists() -> None:
    task = TASKS.get("detection")()
    assert isinstance(task, DetectionTask) and task.primary_metric == "map"
    batch = a_batch(3)
    assert task.batch_size(batch) == 3
    assert len({tuple(image.shape) for image in batch.images}) > 1  # sizes vary
    moved = task.to_device(batch, torch.device("cpu"))
    assert torch.equal(moved.targets[1]["boxes"], batch.targets[1]["boxes"])
    assert task.example_input(batch).shape == (1, *batch.images[0].shape)


def test_training_loss_is_the_sum_of_the_detector_losses_and_needs_train_mode() -> None:
    model, task, batch = tiny_fcos(), DetectionTask(), a_batch()
    model.train()
    total, parts = task.training_loss(model, batch)
    assert set(parts) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-5)
    total.backward()
    model.eval()
    with pytest.raises(RuntimeError, match="train mode"):
        task.training_loss(model, batch)


def test_images_without_objects_train() -> None:
    model, task = tiny_fcos(), DetectionTask()
    batch = a_batch()
    batch.targets[0]["boxes"] = torch.zeros((0, 4))
    batch.targets[0]["labels"] = torch.zeros((0,), dtype=torch.int64)
    model.train()
    total, _ = task.training_loss(model, batch)
    assert torch.isfinite(total)


def test_forward_runs_transform_and_backbone_only_and_matches_the_training_input() -> None:
    model, task, batch = tiny_fcos(), DetectionTask(), a_batch()

    def fail(module: nn.Module, args: Any) -> None:
        raise AssertionError("the head must not run in the tapped teacher forward")

    model.eval()
    with Taps(model, ["backbone"]) as taps, torch.no_grad():
        hook = model.head.register_forward_pre_hook(fail)
        task.forward(model, batch)
        hook.remove()
        teacher_levels = [level.clone() for level in taps.levels()]
        # The same model in its full training forward sees the very same FPN levels: the
        # transform is the same in both modes for a single min_size.
        model.train()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                module.eval()
        task.training_loss(model, batch)
        student_levels = taps.levels()
    assert len(teacher_levels) == 5
    for t, s in zip(teacher_levels, student_levels, strict=True):
        assert torch.allclose(t, s, atol=1e-6)


# --- COCO mAP ---------------------------------------------------------------------------------


def test_perfect_detections_score_one() -> None:
    gt = [
        truth([box(0, 0, 10, 10), box(20, 20, 60, 60)], [1, 2]),
        truth([box(5, 5, 120, 110)], [1]),
    ]
    dets = [found(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in gt]
    metrics = coco_map(gt, dets, [(128, 128), (128, 128)])
    names = {"map", "map50", "map75", "map_small", "map_medium", "map_large"}
    assert metrics == pytest.approx(dict.fromkeys(names, 1.0))


def test_one_of_two_objects_found_scores_the_coco_interpolated_half() -> None:
    gt = [truth([box(0, 0, 10, 10), box(20, 20, 30, 30)], [1, 1])]
    # Recall reaches 0.5 at precision 1: COCO averages precision over 101 recall points
    # 0, 0.01, ..., 1 and 51 of them (0 ... 0.5) have precision 1, the rest 0.
    one = coco_map(gt, [found([box(0, 0, 10, 10)], [0.9], [1])], [(64, 64)])
    assert one["map"] == pytest.approx(51 / 101) and one["map50"] == pytest.approx(51 / 101)
    # A higher-scored false positive halves the precision at that recall.
    with_fp = coco_map(
        gt, [found([box(40, 40, 50, 50), box(0, 0, 10, 10)], [0.95, 0.9], [1, 1])], [(64, 64)]
    )
    assert with_fp["map"] == pytest.approx(0.5 * 51 / 101)
    # Only small objects: the medium and large buckets are undefined, hence absent.
    assert set(one) == {"map", "map50", "map75", "map_small"}


def test_map_averages_over_classes_and_localisation_thresholds() -> None:
    gt = [truth([box(0, 0, 10, 10), box(20, 20, 30, 30)], [1, 2])]
    # Class 1 found exactly; class 2 missed; a box of IoU 0.6 counts at .50 but not at .75.
    dets = [found([box(0, 0, 10, 10), box(40, 40, 50, 50)], [0.9, 0.8], [1, 2])]
    assert coco_map(gt, dets, [(64, 64)])["map"] == pytest.approx(0.5)
    shifted = [found([box(0, 0, 10, 6)], [0.9], [1])]  # IoU with (0,0,10,10) is 0.6
    metrics = coco_map([truth([box(0, 0, 10, 10)], [1])], shifted, [(64, 64)])
    assert metrics["map50"] == pytest.approx(1.0) and metrics["map75"] == 0.0
    assert metrics["map"] == pytest.approx(0.3)  # IoU thresholds .50, .55, .60 of ten


def test_nothing_found_or_nothing_to_find_scores_zero() -> None:
    gt = [truth([box(0, 0, 10, 10)], [1])]
    assert coco_map(gt, [found([], [], [])], [(64, 64)]) == {
        "map": 0.0,
        "map50": 0.0,
        "map75": 0.0,
        "map_small": 0.0,
    }
    nothing = coco_map([truth([], [])], [found([box(0, 0, 5, 5)], [0.5], [1])], [(64, 64)])
    assert nothing == {"map": 0.0, "map50": 0.0, "map75": 0.0}


class Oracle(nn.Module):
    """Returns the ground truth as detections, plus a background-class box that must be ignored."""

    def __init__(self, targets: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.targets = iter(targets)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for _ in images:
            target = next(self.targets)
            boxes = torch.cat([target["boxes"], torch.tensor([[0.0, 0.0, 5.0, 5.0]])])
            labels = torch.cat([target["labels"], torch.tensor([0])])
            scores = torch.ones(len(labels))
            outputs.append({"boxes": boxes, "labels": labels, "scores": scores})
        return outputs


def test_evaluate_scores_a_model_over_batches() -> None:
    task = DetectionTask()
    batches = [a_batch(2), a_batch(3)]
    oracle = Oracle([t for batch in batches for t in batch.targets]).eval()
    metrics = task.evaluate(oracle, batches, torch.device("cpu"))
    assert metrics["map"] == pytest.approx(1.0)


# --- the MasKD stages on a detector -----------------------------------------------------------


def detection_spec() -> JobSpec:
    model_args = {"backbone": "tiny", "min_size": 64, "max_size": 64}
    return JobSpec.model_validate(
        {
            "task": "detection",
            "teacher": {
                "arch": "fcos",
                "args": {**model_args, "fpn_channels": 64, "tiny_width": 16},
                "layers": ["backbone"],
            },
            "student": {
                "arch": "fcos",
                "args": {**model_args, "fpn_channels": 32, "tiny_width": 8, "head_convs": 1},
                "layers": ["backbone"],
            },
            "dataset": {"name": "procedural_boxes", "args": SMALL_DATA, "val_fraction": 0.25},
            "stage1": {"iterations": 2},
            "stage2": {"iterations": 2, "custom_mask_warmup": 1},
            "batch_size": 2,
            "device": "cpu",
            "checkpoint_every": 100,
        }
    )


def context(spec: JobSpec) -> TrainContext:
    task = DetectionTask()
    train, val = split_dataset(build_dataset(spec), spec.dataset.val_fraction, spec.seed)
    return TrainContext(
        spec=spec,
        task=task,
        train_batches=lambda start: train_batches(train, task, spec.batch_size, spec.seed, start),
        val_batches=lambda: val_batches(val, task, spec.batch_size),
        device=torch.device("cpu"),
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_both_stages_cover_every_fpn_level_and_stage1_trains_only_the_tokens(
    tmp_path: Path,
) -> None:
    spec = detection_spec()
    plan = validate_job(spec)
    assert [lv.teacher_shape[0] for lv in plan.levels] == [64] * 5
    assert [lv.student_shape for lv in plan.levels] == [
        (32, 8, 8),
        (32, 4, 4),
        (32, 2, 2),
        (32, 1, 1),
        (32, 1, 1),
    ]
    ctx = context(spec)
    teacher = MODELS.get("fcos")(MODELS.parse_args("fcos", spec.teacher.args), 3)
    student = MODELS.get("fcos")(MODELS.parse_args("fcos", spec.student.args), 3)
    tokens = TokenSet([lv.teacher_channels for lv in plan.levels], spec.stage1.tokens, True)
    teacher_before, tokens_before = snapshot(teacher), snapshot(tokens)

    run_stage1(ctx, teacher, tokens, plan, tmp_path / "stage1.pt")
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key  # BN statistics included
    for level in range(5):  # the detector's loss reached the tokens of every level
        changed = [
            not torch.equal(v, tokens_before[f"{level}.{k}"])
            for k, v in tokens.level(level).state_dict().items()
        ]
        assert all(changed), f"level {level}"

    student_before = snapshot(student)
    result = run_stage2(ctx, teacher, student, tokens, plan, tmp_path / "stage2.pt")
    assert result.step == 2
    trained = torch.load(tmp_path / "stage2.pt", weights_only=True)["modules"]["aligns"]
    torch.manual_seed(spec.seed)  # run_stage2 builds its aligns right after this seeding
    initial = build_aligns(plan, spec.stage2.align).state_dict()
    # Each level's 1x1 align conv gets gradient only through that level's MasKD term.
    for level in range(5):
        weight = f"{level}.weight"
        assert not torch.equal(trained[weight], initial[weight]), f"level {level}"
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


def test_a_detection_job_runs_end_to_end_with_a_trained_teacher(tmp_path: Path) -> None:
    spec = detection_spec()
    teacher_file = tmp_path / "teacher.pt"
    teacher_metrics = train_teacher(spec, teacher_file, iterations=2)
    assert "teacher_map" in teacher_metrics
    job = spec.model_copy(
        update={"teacher": spec.teacher.model_copy(update={"weights": str(teacher_file)})}
    )
    result = run_job(job, tmp_path / "job", baseline=True)
    summary = result.runs[0].summary
    metrics = summary["metrics"]
    for name in ("teacher", "masked_teacher", "student", "baseline"):
        assert 0.0 <= metrics[f"{name}_map"] <= 1.0
    assert metrics["teacher_map"] == pytest.approx(teacher_metrics["teacher_map"])
    assert summary["primary_metric"] == "map"
    assert result.runs[0].workdir.student.is_file() and result.tokens_path.is_file()
    assert len(summary["plan"]["levels"]) == 5
