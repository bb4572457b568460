"""Zero-config pairing: a spec without ``layers`` is distilled at its models' default taps, the
pairing is in the plan, and pairs whose levels cannot line up are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from maskd_core_toys import refused, seg_spec

from maskd_core.models import MODELS, build_model, with_default_layers
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec
from maskd_core.validate import _lines_up as lines_up
from maskd_core.validate import validate_job

NO_LAYERS = {"teacher": {"layers": None}, "student": {"layers": None}}
"""Over ``seg_spec``'s tiny teacher and student, which name their layers."""


def det_spec(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    size = {"backbone": "tiny", "min_size": 64, "max_size": 64}
    return {
        "task": "detection",
        "dataset": {"name": "procedural_boxes", "args": {"num_samples": 2, "image_size": 64}},
        "teacher": {**teacher, "args": {**size, "fpn_channels": 64, **teacher.get("args", {})}},
        "student": {**student, "args": {**size, "fpn_channels": 32, **student.get("args", {})}},
        "device": "cpu",
    }


def test_a_segmentation_pair_without_layers_pairs_the_logits() -> None:
    spec = JobSpec.model_validate(seg_spec(**NO_LAYERS))
    assert spec.teacher.layers is None
    plan = validate_job(spec)
    pairing = plan.pairing()
    assert pairing["layers_from"] == {
        "teacher": "registry defaults",
        "student": "registry defaults",
    }
    assert pairing["levels"] == [
        {
            "teacher_layer": "head",
            "student_layer": "head",
            "level": 0,
            "teacher": {"channels": 5, "size": [4, 4], "stride": 8},
            "student": {"channels": 5, "size": [4, 4], "stride": 8},
            "align": "conv1x1 5->5",
            "resize": None,
        }
    ]
    assert (
        plan.pairing_line() == "head->head (1 level); teacher and student layers: registry defaults"
    )
    assert json.loads(json.dumps(plan.to_dict()))["pairing"] == pairing


def test_a_detection_pair_without_layers_pairs_the_five_fpn_levels() -> None:
    plan = validate_job(JobSpec.model_validate(det_spec({"arch": "fcos"}, {"arch": "retinanet"})))
    levels = plan.pairing()["levels"]
    assert [(lv["teacher"]["stride"], lv["student"]["stride"]) for lv in levels] == [
        (s, s) for s in (8, 16, 32, 64, 128)
    ]
    assert [lv["teacher"]["size"] for lv in levels] == [[8, 8], [4, 4], [2, 2], [1, 1], [1, 1]]
    assert {lv["align"] for lv in levels} == {"conv1x1 32->64"}
    assert plan.pairing_line().startswith("backbone->backbone (5 levels)")


def test_named_layers_are_kept_and_one_side_may_default() -> None:
    spec = JobSpec.model_validate(seg_spec(teacher={"layers": ["head"]}, student={"layers": None}))
    resolved = with_default_layers(spec)
    assert (resolved.teacher.layers, resolved.student.layers) == (["head"], ["head"])
    plan = validate_job(spec)
    assert plan.pairing()["layers_from"] == {"teacher": "spec", "student": "registry defaults"}


def test_a_users_state_dict_of_a_registry_architecture_pairs_the_same(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(seg_spec(**NO_LAYERS))
    weights = tmp_path / "teacher.pt"
    torch.save(build_model(spec.teacher, 5).state_dict(), weights)
    teacher = spec.teacher.model_copy(update={"weights": str(weights)})
    plan = validate_job(spec.model_copy(update={"teacher": teacher}))
    assert [(lv.teacher_layer, lv.teacher_stride) for lv in plan.levels] == [("head", 8)]


def test_defaults_at_other_strides_are_refused_with_the_strides() -> None:
    err = refused(det_spec({"arch": "retinanet"}, {"arch": "fasterrcnn"}))
    assert err.field == "student.layers"
    assert "strides 8, 16, 32, 64, 128 (backbone)" in str(err)
    assert "4, 8, 16, 32, 64 (backbone)" in str(err) and "name the layers" in str(err)


def test_defaults_of_other_sizes_are_refused() -> None:
    spec = det_spec({"arch": "fcos"}, {"arch": "fcos", "args": {"min_size": 32, "max_size": 32}})
    err = refused(spec)
    assert err.field == "student.layers" and "8x8 on the teacher and 4x4 on the student" in str(err)
    spec["teacher"]["layers"] = spec["student"]["layers"] = ["backbone"]
    named = validate_job(JobSpec.model_validate(spec)).levels[0]
    assert named.student_shape[1:] == (4, 4)  # named, the student's maps are resized to 8x8
    assert named.described("conv1x1")["resize"] == "bilinear 4x4->8x8"


def test_maps_line_up_when_scaled_alike_along_both_axes() -> None:
    assert lines_up((256, 13, 17), (128, 7, 9))  # a 100x130 image at strides 8 and 16
    assert lines_up((5, 1, 1), (5, 1, 1)) and lines_up((5, 2, 3), (5, 1, 2))
    assert not lines_up((5, 8, 8), (5, 8, 16))
    assert not lines_up((5, 8, 8), (5, 16, 8))
    assert not lines_up((5, 100, 150), (5, 100, 200))


def test_layer_counts_that_differ_are_refused() -> None:
    err = refused(seg_spec(teacher={"layers": ["backbone", "head"]}, student={"layers": None}))
    assert err.field == "student.layers"
    assert "the default taps of seg_tiny_student: ['head']" in str(err)


def test_aux_weight_on_a_model_without_an_aux_head_is_refused() -> None:
    spec = seg_spec(
        **NO_LAYERS, stage2={"method": {"name": "maskd", "params": {"aux_weight": 0.4}}}
    )
    err = refused(spec)
    assert err.field == "stage2.method.params.aux_weight" and "has none" in str(err)


def test_a_model_without_default_taps_needs_its_layers() -> None:
    if "test_pairing_toy" not in MODELS:
        MODELS.register("test_pairing_toy")(lambda args, num_classes: torch.nn.Identity())
    err = refused(seg_spec(teacher={"arch": "test_pairing_toy", "layers": None}))
    assert err.field == "teacher.layers" and "has no default taps" in str(err)


@pytest.mark.slow
def test_a_job_without_layers_reports_its_pairing_in_the_summary(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        seg_spec(
            **NO_LAYERS,
            batch_size=2,
            stage1={"iterations": 2},
            stage2={"iterations": 2},
        )
    )
    result = run_job(spec, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    pairing = summary["plan"]["pairing"]
    assert pairing["layers_from"]["student"] == "registry defaults"
    assert [(lv["teacher_layer"], lv["student_layer"]) for lv in pairing["levels"]] == [
        ("head", "head")
    ]
    assert result.spec.distilled_student.layers == ["head"]
