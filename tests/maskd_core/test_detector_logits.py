"""A one-stage detector's class logits as distilled levels: the tapped logits are the head's own,
the teacher forward runs the head only when they are tapped, the plan marks them, logit methods
(PCD, SAMKD's logit term) distil them in a job, and what cannot be paired is refused."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead

from maskd_core.callbacks import Callback, Stage
from maskd_core.data import DATASETS
from maskd_core.errors import SpecError
from maskd_core.methods import build_distiller, distils_logits, method_setup
from maskd_core.methods_masked import SAMKD_LOGITS_WEIGHT, SamkdDistiller
from maskd_core.models import MODELS
from maskd_core.models.detection import CLASS_LOGITS, DETECTOR_FAMILIES
from maskd_core.plan import ClassLogits
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec
from maskd_core.taps import Taps, reads_within
from maskd_core.tasks.detection import DetectionBatch, DetectionTask
from maskd_core.validate import validate_job

CLASSES = 3
OUTPUTS = CLASSES + 1  # torchvision's convention: output 0 is background, never a target
DATA = {"num_samples": 8, "image_size": 64, "max_object_size": 24}
ARGS: dict[str, Any] = {"backbone": "tiny", "min_size": 64, "max_size": 64, "fpn_channels": 64}
"""64 FPN channels: FCOS's GroupNorm(32) then has two values per group on a 1x1 P7 of a batch
of one image (validation's sample), which 32 channels would not."""
TORCHVISION_FORWARD = {"retinanet": RetinaNetClassificationHead, "fcos": FCOSClassificationHead}
ANCHORS = {"retinanet": 9, "fcos": 1}


def detector(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS.get(arch)(MODELS.parse_args(arch, ARGS), CLASSES)


def a_batch(size: int = 2) -> DetectionBatch:
    dataset = DATASETS.get("procedural_boxes")(DATASETS.parse_args("procedural_boxes", DATA), 0)
    return DetectionTask().collate([dataset[i] for i in range(size)])


def spec_body(
    arch: str,
    method: str,
    teacher_layers: list[str] | None = None,
    student_arch: str | None = None,
    student_layers: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "task": "detection",
        "teacher": {
            "arch": arch,
            "layers": teacher_layers or [CLASS_LOGITS],
            "args": {**ARGS, "tiny_width": 16},
        },
        "student": {
            "arch": student_arch or arch,
            "layers": student_layers or teacher_layers or [CLASS_LOGITS],
            "args": {**ARGS, "tiny_width": 8},
        },
        "dataset": {"name": "procedural_boxes", "args": DATA, "val_fraction": 0.25},
        "stage1": {"iterations": 1},
        "stage2": {"iterations": 3, "method": {"name": method}},
        "batch_size": 2,
        "device": "cpu",
        "checkpoint_every": 100,
        "max_eval_batches": 1,
    }


def refusal(body: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as err:
        validate_job(JobSpec.model_validate(body))
    return err.value


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_tapped_class_logits_are_the_heads_own_outputs(arch: str) -> None:
    model = detector(arch).eval()
    head = model.head.classification_head
    assert head.num_anchors == DETECTOR_FAMILIES[arch].anchors == ANCHORS[arch]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = list(model.backbone(images).values())
        with Taps(model, [CLASS_LOGITS]) as taps:
            ours = head(features)
            tapped = taps.layer_levels(0)
        reference = TORCHVISION_FORWARD[arch].forward(head, features)  # torchvision's own code
        raw = [head.cls_logits(head.conv(level)) for level in features]  # [N, A·K, H, W]
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert len(tapped) == len(features) == 5
    anchors = ANCHORS[arch]
    for level, logits in zip(tapped, raw, strict=True):
        n, _, h, w = logits.shape
        assert level.shape == (n * anchors, OUTPUTS, h, w)
        for image in range(n):  # row (image, anchor) holds channels anchor·K .. anchor·K + K-1
            for anchor in range(anchors):
                torch.testing.assert_close(
                    level[image * anchors + anchor],
                    logits[image, anchor * OUTPUTS : (anchor + 1) * OUTPUTS],
                    rtol=0,
                    atol=0,
                )


def test_a_replaced_class_logit_level_is_what_the_head_outputs() -> None:
    """Stage 1 masks the levels it taps: the head must go on with the replaced logits."""
    model = detector("retinanet").eval()
    head = model.head.classification_head
    with torch.no_grad():
        features = list(model.backbone(torch.randn(1, 3, 64, 64)).values())
        with Taps(model, [CLASS_LOGITS], replace=lambda _, level, x: x * 0 + level):
            out = head(features)
    counts = [f.shape[-2] * f.shape[-1] * ANCHORS["retinanet"] for f in features]
    expected = torch.cat([torch.full((1, c, OUTPUTS), float(k)) for k, c in enumerate(counts)], 1)
    torch.testing.assert_close(out, expected)


def test_the_teacher_forward_runs_the_head_only_when_a_tap_reads_it() -> None:
    model = detector("retinanet").eval()
    calls: list[int] = []
    model.head.classification_head.cls_logits.register_forward_hook(
        lambda *_: calls.append(1)  # type: ignore[arg-type,return-value]
    )
    task, batch = DetectionTask(), a_batch(1)
    with Taps(model, ["backbone"]) as taps, torch.no_grad():
        assert not reads_within(model.head)
        task.forward(model, batch)
        assert len(taps.layer_levels(0)) == 5 and calls == []
    with Taps(model, [CLASS_LOGITS]) as taps, torch.no_grad():
        assert reads_within(model.head) and reads_within(model)
        task.forward(model, batch)
        assert len(taps.layer_levels(0)) == 5 and len(calls) == 5
    assert not reads_within(model.head)


@pytest.mark.parametrize("arch", ["retinanet", "fcos"])
def test_the_plan_marks_the_class_logit_levels_and_only_them(arch: str) -> None:
    layers = ["backbone", CLASS_LOGITS]
    plan = validate_job(JobSpec.model_validate(spec_body(arch, "samkd", teacher_layers=layers)))
    marks = [lv.class_logits for lv in plan.levels]
    assert marks == [None] * 5 + [ClassLogits(classes=OUTPUTS, anchors=ANCHORS[arch])] * 5
    assert [lv.teacher_shape[0] for lv in plan.levels] == [64] * 5 + [OUTPUTS] * 5
    described = plan.pairing()["levels"]
    assert "class_logits" not in described[0]
    assert described[5]["class_logits"] == {"classes": OUTPUTS, "anchors": ANCHORS[arch]}


def test_samkd_distils_a_detectors_class_logits_with_its_logit_term() -> None:
    spec = JobSpec.model_validate(spec_body("retinanet", "samkd"))
    plan = validate_job(spec)
    setup = method_setup(spec, plan, spec.stage2.method, None)
    assert distils_logits(setup)
    distiller = build_distiller(setup)
    assert isinstance(distiller, SamkdDistiller)
    assert distiller.logit_levels == [True] * 5 and distiller.weight == SAMKD_LOGITS_WEIGHT


def test_pcd_on_a_detectors_features_names_the_class_logits_to_tap() -> None:
    err = refusal(spec_body("retinanet", "pcd", teacher_layers=["backbone"]))
    assert err.field == "teacher.layers[0]"
    assert CLASS_LOGITS in str(err) and "features, not class logits" in str(err)


def test_pcd_on_faster_rcnn_is_refused_with_the_reason() -> None:
    err = refusal(spec_body("fasterrcnn", "pcd", teacher_layers=["backbone"]))
    assert err.field == "teacher.layers[0]"
    assert "per RoI" in str(err) and "one-stage detectors (retinanet, fcos)" in str(err)


def test_class_logits_paired_with_features_are_refused() -> None:
    err = refusal(spec_body("retinanet", "fitnet", student_layers=["backbone.fpn"]))
    assert err.field == "student.layers[0]"
    assert "teacher layer" in str(err) and "student layer 'backbone.fpn' is not" in str(err)


def test_class_logits_of_detectors_with_other_anchors_are_refused() -> None:
    err = refusal(spec_body("retinanet", "pcd", student_arch="fcos"))
    assert err.field == "student.layers[0]"
    assert "9 anchors per pixel" in str(err) and "(fcos) 1" in str(err)


class StepRecorder(Callback):
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        if stage.kind == "stage2":
            self.metrics.append(dict(metrics))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "method"),
    [("retinanet", "pcd"), ("fcos", "pcd"), ("fcos", "samkd"), ("retinanet", "maskd")],
)
def test_a_detection_job_distils_the_class_logits(arch: str, method: str, tmp_path: Path) -> None:
    spec = JobSpec.model_validate({**spec_body(arch, method), "eval_every": 2})
    steps = StepRecorder()

    result = run_job(spec, tmp_path, callbacks=steps)

    assert len(steps.metrics) == spec.stage2.iterations  # eval at step 2 left the taps whole
    assert all(0 < m["kd_loss"] < float("inf") for m in steps.metrics)
    summary = result.runs[0].summary
    assert summary["method"] == method and "student_map" in summary["metrics"]
