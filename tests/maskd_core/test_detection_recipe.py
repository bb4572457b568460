"""The official detection recipe beside MasKD: inheriting, head-level regression KD, and the
MasKD loss weight that follows the student's detector family. Real torchvision detectors with
tiny backbones at 64 px."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from maskd_core_toys import seg_spec
from torch import nn

from maskd_core.callbacks import Callback, Stage
from maskd_core.data import DATASETS, build_dataset
from maskd_core.detection_recipe import (
    HeadDistillation,
    head_regression_loss,
    inherit_teacher_weights,
)
from maskd_core.errors import SpecError
from maskd_core.loader import split_dataset, train_batches, val_batches
from maskd_core.methods import MaskdDistiller, effective_params, method_setup
from maskd_core.models import MODELS
from maskd_core.models.detection import RETINANET
from maskd_core.plan import JobPlan
from maskd_core.runner import run_job
from maskd_core.spec import HeadRegressionSpec, JobSpec, MethodSpec
from maskd_core.stages import TrainContext, run_stage2
from maskd_core.taps import Taps
from maskd_core.tasks.detection import DetectionBatch, DetectionTask
from maskd_core.tokens import TokenSet
from maskd_core.validate import validate_job
from tests.examples_testkit import example_document

SMALL_DATA = {"num_samples": 8, "image_size": 64, "max_object_size": 24, "vary_size": True}
SIZES = {"backbone": "tiny", "min_size": 64, "max_size": 64}


def detector(arch: str, seed: int, **args: Any) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS.get(arch)(MODELS.parse_args(arch, {**SIZES, **args}), 3)


def a_batch(size: int = 2) -> DetectionBatch:
    dataset = DATASETS.get("procedural_boxes")(
        DATASETS.parse_args("procedural_boxes", SMALL_DATA), 0
    )
    return DetectionTask().collate([dataset[i] for i in range(size)])


def spec_body(teacher: dict[str, Any], student: dict[str, Any], **stage2: Any) -> dict[str, Any]:
    return {
        "task": "detection",
        "teacher": {"layers": ["backbone"], **teacher, "args": {**SIZES, **teacher["args"]}},
        "student": {"layers": ["backbone"], **student, "args": {**SIZES, **student["args"]}},
        "dataset": {"name": "procedural_boxes", "args": SMALL_DATA, "val_fraction": 0.25},
        "stage1": {"iterations": 1},
        "stage2": {"iterations": 2, **stage2},
        "batch_size": 2,
        "device": "cpu",
        "checkpoint_every": 100,
    }


class StepRecorder(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        self.metrics.append(dict(metrics))


def refusal(body: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as err:
        validate_job(JobSpec.model_validate(body))
    return err.value


# --- inheriting -------------------------------------------------------------------------------


def test_inheriting_copies_exactly_the_neck_and_head_tensors_of_equal_name_and_shape() -> None:
    # Backbones of different widths: the FPN's lateral convs differ in their input channels,
    # everything after them (FPN outputs, P6/P7, the head) has equal shapes.
    teacher = detector("retinanet", 0, tiny_width=16, fpn_channels=32)
    student = detector("retinanet", 1, tiny_width=8, fpn_channels=32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    theirs = teacher.state_dict()

    inherited = inherit_teacher_weights(teacher, student, RETINANET)

    after = student.state_dict()
    copied, kept_as_built = [], []
    for name, value in after.items():
        in_neck_or_head = name.startswith(("backbone.fpn.", "head."))
        if in_neck_or_head and theirs[name].shape == value.shape:
            assert torch.equal(value, theirs[name]), name
            if name.endswith("weight"):  # random, unlike the zero biases: it really changed
                assert not torch.equal(value, before[name]), name
            copied.append(name)
        else:
            assert torch.equal(value, before[name]), name  # left alone
            if in_neck_or_head:
                kept_as_built.append(name)
    assert any(name.startswith("backbone.fpn.inner_blocks") for name in kept_as_built)
    assert any(name.startswith("head.regression_head") for name in copied)
    assert inherited.tensors == len(copied)
    assert inherited.parameters == sum(after[name].numel() for name in copied)
    assert sorted(inherited.kept) == sorted(kept_as_built)


def test_validation_refuses_inheriting_when_nothing_matches_or_the_families_differ() -> None:
    narrow = {"arch": "retinanet", "args": {"fpn_channels": 16}}
    wide = {"arch": "retinanet", "args": {"fpn_channels": 32}}
    err = refusal(spec_body(wide, narrow, inherit_teacher_weights=True))
    assert err.field == "stage2.inherit_teacher_weights"
    assert "nothing would be inherited" in str(err) and "fpn_channels" in str(err)

    fcos = {"arch": "fcos", "args": {"fpn_channels": 32}}
    err = refusal(spec_body(wide, fcos, inherit_teacher_weights=True))
    assert err.field == "stage2.inherit_teacher_weights"
    assert "retinanet detector and the student a fcos one" in str(err)


def test_validation_refuses_inheriting_for_segmentation() -> None:
    err = refusal(seg_spec(stage2={"inherit_teacher_weights": True}))
    assert err.field == "stage2.inherit_teacher_weights" and "applies to detectors" in str(err)


# --- head-level regression KD -----------------------------------------------------------------


@pytest.mark.parametrize("loss", ["l1", "smooth_l1", "mse"])
def test_head_regression_loss_against_its_formula_and_its_gradient(
    loss: Literal["l1", "smooth_l1", "mse"],
) -> None:
    settings = HeadRegressionSpec(loss=loss, beta=0.5)
    generator = torch.Generator().manual_seed(0)
    teachers = [torch.randn(2, 36, h, h, generator=generator) for h in (8, 4, 2)]
    students = [(t + torch.randn(t.shape, generator=generator)).requires_grad_() for t in teachers]
    value = head_regression_loss(students, teachers, settings)
    torch.autograd.backward(value)
    expected = torch.zeros(())
    for s, t in zip(students, teachers, strict=True):
        d = s.detach().double() - t.double()
        if loss == "l1":
            element, slope = d.abs(), d.sign()
        elif loss == "mse":
            element, slope = d**2, 2 * d
        else:  # 0.5 d²/β inside |d| < β, |d| − β/2 outside
            inside = d.abs() < 0.5
            element = torch.where(inside, 0.5 * d**2 / 0.5, d.abs() - 0.25)
            slope = torch.where(inside, d / 0.5, d.sign())
        expected = expected + element.mean()
        # the gradient pulls the student towards the teacher: the sign of s − t, per mean
        assert s.grad is not None
        torch.testing.assert_close(s.grad.double(), slope / d.numel())
    torch.testing.assert_close(value.double(), expected)
    assert head_regression_loss(teachers, teachers, settings).item() == 0.0


def test_per_call_taps_give_a_shared_head_one_level_per_call() -> None:
    model = detector("retinanet", 0, fpn_channels=32)
    batch = a_batch()
    model.eval()
    with (
        Taps(model, ["head.regression_head.bbox_reg"], per_call=True) as every_call,
        Taps(model, ["head.regression_head.bbox_reg"]) as latest,
        torch.no_grad(),
    ):
        model(batch.images)
        levels = every_call.layer_levels(0)
        assert [lv.shape[-1] for lv in levels] == [8, 4, 2, 1, 1]  # P3-P7 of 64 px
        assert all(lv.shape[1] == 9 * 4 for lv in levels)  # 9 anchors x 4 coordinates
        assert len(latest.layer_levels(0)) == 1 and latest.layer_levels(0)[0] is levels[-1]
        every_call.clear()
        with pytest.raises(RuntimeError, match="did not run"):
            every_call.layer_levels(0)


def test_head_kd_is_zero_for_a_student_equal_to_its_teacher_and_positive_otherwise() -> None:
    # Frozen BatchNorm, so the teacher's eval forward and the student's training forward
    # compute the same function of the same resized images.
    teacher = detector("retinanet", 0, fpn_channels=32, norm="frozen_batchnorm")
    twin = detector("retinanet", 0, fpn_channels=32, norm="frozen_batchnorm")
    other = detector("retinanet", 1, fpn_channels=32, norm="frozen_batchnorm")
    task, batch = DetectionTask(), a_batch()
    for student, zero in ((twin, True), (other, False)):
        head = HeadDistillation(teacher, student, RETINANET, HeadRegressionSpec())
        teacher.eval()
        student.train()
        with head.taps[0], head.taps[1]:
            with torch.no_grad():
                head.teacher_forward(teacher, batch)
            task.training_loss(student, batch)
            value = head.loss()
            for taps in head.taps:  # the loss cleared both
                with pytest.raises(RuntimeError, match="did not run"):
                    taps.layer_levels(0)
        assert (abs(value.item()) < 1e-6) is zero, value.item()


def test_validation_refuses_head_kd_for_two_stage_detectors_and_unequal_sizes() -> None:
    faster = {"arch": "fasterrcnn", "args": {"fpn_channels": 32}}
    err = refusal(spec_body(faster, faster, head_regression={"weight": 1.0}))
    assert err.field == "stage2.head_regression" and "RoIs" in str(err)

    retina = {"arch": "retinanet", "args": {"fpn_channels": 32}}
    bigger = {"arch": "retinanet", "args": {"fpn_channels": 32, "min_size": 96, "max_size": 96}}
    err = refusal(spec_body(retina, bigger, head_regression={}))
    assert err.field == "stage2.head_regression" and "min_size" in str(err)


@pytest.mark.parametrize(("method", "weight"), [("maskd", 7.0), ("none", 0.0)])
def test_stage2_inherits_adds_head_kd_and_reports_both(method: str, weight: float) -> None:
    """With MasKD (the RetinaNet family's weight 7) and without any feature KD."""
    teacher_spec = {"arch": "retinanet", "args": {"fpn_channels": 32, "tiny_width": 16}}
    student_spec = {"arch": "retinanet", "args": {"fpn_channels": 32, "tiny_width": 8}}
    spec = JobSpec.model_validate(
        spec_body(
            teacher_spec,
            student_spec,
            inherit_teacher_weights=True,
            head_regression={"weight": 2.0, "loss": "smooth_l1"},
            method={"name": method},
        )
    )
    plan = validate_job(spec)
    task = DetectionTask()
    train, val = split_dataset(build_dataset(spec), spec.dataset.val_fraction, spec.seed)
    steps = StepRecorder()
    ctx = TrainContext(
        spec=spec,
        task=task,
        train_batches=lambda start: train_batches(train, task, spec.batch_size, spec.seed, start),
        val_batches=lambda: val_batches(val, task, spec.batch_size),
        device=torch.device("cpu"),
        callbacks=steps,
    )
    teacher = detector("retinanet", 0, fpn_channels=32, tiny_width=16)
    student = detector("retinanet", 1, fpn_channels=32, tiny_width=8)
    tokens = None
    if method == "maskd":
        tokens = TokenSet([lv.teacher_channels for lv in plan.levels], spec.stage1.tokens, True)

    result = run_stage2(ctx, teacher, student, tokens, plan, None)

    assert result.inherited is not None and result.inherited.tensors > 0
    assert result.inherited.subtrees == ("backbone.fpn", "head")
    assert len(steps.metrics) == 2
    for metrics in steps.metrics:
        assert metrics["head_kd_loss"] > 0 and (metrics["kd_loss"] > 0) == (method == "maskd")
        kd, head = metrics["kd_loss"], metrics["head_kd_loss"]
        expected = metrics["task_loss"] + weight * kd + 2.0 * head
        assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


# --- MasKD's loss weight by detector family ---------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "weight"), [("retinanet", 7.0), ("fcos", 10.0), ("fasterrcnn", 1.0)]
)
def test_a_detection_student_left_without_loss_weight_gets_its_familys(
    arch: str, weight: float
) -> None:
    model = {"arch": arch, "args": {"fpn_channels": 32}}
    spec = JobSpec.model_validate(spec_body(model, model))
    assert spec.stage2.method.params.get("loss_weight") is None
    plan = JobPlan(num_classes=3, levels=[])
    setup = method_setup(spec, plan, spec.stage2.method, None)
    assert setup.family == MODELS.entry(arch).family
    assert MaskdDistiller.default_weight(setup) == weight
    assert effective_params(setup)["loss_weight"] == weight
    given = MethodSpec(name="maskd", params={"loss_weight": 0.5})
    assert effective_params(method_setup(spec, plan, given, None))["loss_weight"] == 0.5


def test_segmentation_keeps_loss_weight_one() -> None:
    spec = JobSpec.model_validate(seg_spec())
    setup = method_setup(spec, JobPlan(num_classes=3, levels=[]), spec.stage2.method, None)
    assert effective_params(setup)["loss_weight"] == 1.0


def test_only_the_retinanet_paper_spec_inherits_and_distils_the_head() -> None:
    retina = JobSpec.model_validate(example_document("retinanet-r101-r50-coco.yaml"))
    fcos = JobSpec.model_validate(example_document("fcos-r101-r50-coco.yaml"))
    assert retina.stage2.inherit_teacher_weights
    assert retina.stage2.head_regression == HeadRegressionSpec(weight=1.0, loss="l1")
    assert not fcos.stage2.inherit_teacher_weights and fcos.stage2.head_regression is None
    for name in ("quickstart-detection.yaml", "quickstart-segmentation.yaml"):
        spec = JobSpec.model_validate(example_document(name))
        assert not spec.stage2.inherit_teacher_weights and spec.stage2.head_regression is None


@pytest.mark.slow
def test_a_jobs_summary_reports_the_family_weight_and_what_was_inherited(tmp_path: Path) -> None:
    teacher_spec = {"arch": "retinanet", "args": {"fpn_channels": 32, "tiny_width": 16}}
    student_spec = {"arch": "retinanet", "args": {"fpn_channels": 32, "tiny_width": 8}}
    spec = JobSpec.model_validate(
        spec_body(teacher_spec, student_spec, inherit_teacher_weights=True)
    )

    summary = run_job(spec, tmp_path).runs[0].summary

    assert summary["method_params"]["loss_weight"] == 7.0
    inherited = summary["inherited_from_teacher"]
    assert inherited["tensors"] > 0 and inherited["subtrees"] == ["backbone.fpn", "head"]
    assert all(name.startswith("backbone.fpn.inner_blocks") for name in inherited["kept_as_built"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["method_params"] == summary["method_params"]
    assert written["inherited_from_teacher"] == inherited
