from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from maskd_core_toys import ToyFPNNet, refused, seg_spec
from pydantic import BaseModel, ValidationError
from torch import nn

from maskd_core.errors import UnknownNameError
from maskd_core.models import MODELS
from maskd_core.spec import JobSpec
from maskd_core.validate import input_paths, validate_job

if "test_fpn_toy" not in MODELS:

    class _FPNArgs(BaseModel):
        width: int = 4

    @MODELS.register("test_fpn_toy", args=_FPNArgs)
    def _build_fpn_toy(args: _FPNArgs, num_classes: int) -> nn.Module:
        """A toy whose ``neck`` returns two levels (tests only)."""
        return ToyFPNNet(args.width)


def test_valid_spec_gives_levels_from_a_dry_run() -> None:
    plan = validate_job(JobSpec.model_validate(seg_spec()))
    assert plan.num_classes == 5
    assert [(lv.teacher_shape, lv.student_shape) for lv in plan.levels] == [
        ((128, 4, 4), (64, 4, 4)),
        ((5, 4, 4), (5, 4, 4)),
    ]
    assert json.loads(json.dumps(plan.to_dict()))["levels"][1]["teacher_layer"] == "head"


def test_unknown_names_point_at_the_field_with_close_matches() -> None:
    err = refused(seg_spec(teacher={"arch": "seg_tiny_teachr"}))
    assert isinstance(err, UnknownNameError) and err.field == "teacher.arch"
    assert "seg_tiny_teacher" in str(err)
    err = refused(seg_spec(student={"layers": ["backbone", "haed"]}))
    assert err.field == "student.layers[1]" and "Did you mean 'head'" in str(err)
    err = refused(seg_spec(dataset={"name": "procedural_shape"}))
    assert err.field == "dataset.name" and "procedural_shapes" in str(err)


def test_bad_arguments_and_missing_data_are_refused() -> None:
    err = refused(seg_spec(student={"args": {"base_channel": 8}}))
    assert err.field == "student.args" and "base_channels" in str(err)
    err = refused(
        seg_spec(
            dataset={"name": "image_folder", "args": {"root": "/no/such/dir", "num_classes": 3}}
        )
    )
    assert "/no/such/dir" in str(err) and err.field is not None and err.field.startswith("dataset")


def test_unequal_layer_lists_and_duplicates_are_refused() -> None:
    with pytest.raises(ValidationError, match="paired by position"):
        JobSpec.model_validate(seg_spec(student={"layers": ["head"]}))
    err = refused(
        seg_spec(teacher={"layers": ["head", "head"]}, student={"layers": ["head", "backbone"]})
    )
    assert err.field == "teacher.layers[1]" and "twice" in str(err)


def test_level_counts_and_identity_channels_must_match() -> None:
    err = refused(
        seg_spec(
            teacher={"arch": "test_fpn_toy", "layers": ["neck"]},
            student={"arch": "test_fpn_toy", "layers": ["stem"]},
        )
    )
    assert err.field == "student.layers[0]" and "2 levels" in str(err) and "gives 1" in str(err)
    err = refused(seg_spec(stage2={"align": "identity"}))
    assert err.field == "stage2.align" and "128" in str(err) and "64" in str(err)
    plan = validate_job(
        JobSpec.model_validate(
            seg_spec(
                teacher={"arch": "test_fpn_toy", "layers": ["neck"]},
                student={"arch": "test_fpn_toy", "args": {"width": 2}, "layers": ["neck"]},
            )
        )
    )
    assert [lv.student_shape for lv in plan.levels] == [(2, 32, 32), (2, 16, 16)]


def test_weights_that_are_not_a_state_dict_are_refused(tmp_path: Path) -> None:
    missing = refused(seg_spec(teacher={"weights": str(tmp_path / "nope.pt")}))
    assert missing.field == "teacher.weights" and "does not exist" in str(missing)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    err = refused(seg_spec(teacher={"weights": str(tmp_path / "list.pt")}))
    assert err.field == "teacher.weights" and "state_dict()" in str(err)
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "other.pt")
    err = refused(seg_spec(teacher={"weights": str(tmp_path / "other.pt")}))
    assert "does not match the architecture" in str(err)


def test_mixed_precision_on_cpu_is_refused() -> None:
    err = refused(seg_spec(mixed_precision="bf16"))
    assert err.field == "mixed_precision" and "CUDA" in str(err)


def test_input_paths_lists_every_local_file_without_reading_it() -> None:
    spec = JobSpec.model_validate(
        {
            "task": "detection",
            "dataset": {
                "name": "coco",
                "args": {"annotations": "/nowhere/a.json", "images": "/nowhere/img"},
            },
            "teacher": {
                "arch": "fcos",
                "args": {"backbone": "resnet18", "backbone_weights": "/nowhere/r18.pt"},
                "weights": "/nowhere/teacher.pt",
                "layers": ["backbone"],
            },
            "student": {"arch": "fcos", "weights": "models:/p.s@champion", "layers": ["backbone"]},
        }
    )
    found = {item.field: (item.given, item.path, item.root) for item in input_paths(spec)}
    assert found == {
        "teacher.weights": ("/nowhere/teacher.pt", Path("/nowhere/teacher.pt"), None),
        "teacher.args.backbone_weights": ("/nowhere/r18.pt", Path("/nowhere/r18.pt"), None),
        "dataset.args.annotations": ("/nowhere/a.json", Path("/nowhere/a.json"), None),
        "dataset.args.images": ("/nowhere/img", Path("/nowhere/img"), None),
    }


def test_weights_of_the_wrong_shape_are_a_spec_error(tmp_path: Path) -> None:
    """Same keys, other widths: a SpecError naming the tensor, not torch's RuntimeError."""
    wide = MODELS.get("seg_tiny_student")(
        MODELS.parse_args("seg_tiny_student", {"base_channels": 24}), 5
    )
    weights = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), weights)
    err = refused(seg_spec(student={"weights": str(weights)}))
    assert err.field == "student.weights" and "wrong shape" in str(err)
