"""``maskd_core.model_probe``: a pairing's shapes are found once per process, by exact key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from maskd_core_toys import refused, seg_spec
from torch import nn

from maskd_core import model_probe
from maskd_core.models import MODELS, build_model
from maskd_core.spec import JobSpec, ModelSpec
from maskd_core.validate import validate_job


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The architectures the probe built, in order, with an empty probe cache."""
    monkeypatch.setattr(model_probe, "_probed", {})
    built: list[str] = []
    real_build = build_model

    def counting_build(spec: ModelSpec, num_classes: int, field: str = "model") -> nn.Module:
        built.append(spec.arch)
        return real_build(spec, num_classes, field)

    monkeypatch.setattr(model_probe, "build_model", counting_build)
    return built


def test_a_repeated_pairing_is_validated_without_building_its_models(builds: list[str]) -> None:
    first = validate_job(JobSpec.model_validate(seg_spec()))
    again = validate_job(JobSpec.model_validate(seg_spec(seed=7, name="another")))
    assert builds == ["seg_tiny_teacher", "seg_tiny_student"], "built once, for the first"
    assert again == first


def test_other_args_or_input_sizes_are_probed_again(builds: list[str]) -> None:
    first = validate_job(JobSpec.model_validate(seg_spec()))
    wider = validate_job(JobSpec.model_validate(seg_spec(student={"args": {"base_channels": 24}})))
    bigger = validate_job(
        JobSpec.model_validate(seg_spec(dataset={"args": {"num_samples": 4, "image_size": 64}}))
    )
    assert builds.count("seg_tiny_student") == 3 and builds.count("seg_tiny_teacher") == 2
    assert wider.levels[0].student_shape[0] != first.levels[0].student_shape[0]
    assert bigger.levels[0].teacher_shape[1:] != first.levels[0].teacher_shape[1:]


def test_a_replaced_weights_file_is_checked_again(builds: list[str], tmp_path: Path) -> None:
    """The cache keys a weights file by path, size and modification time: a file replaced by
    one of the wrong shape is refused, not answered from the cache."""
    weights = tmp_path / "student.pt"
    fitting = MODELS.get("seg_tiny_student")(MODELS.parse_args("seg_tiny_student", {}), 5)
    torch.save(fitting.state_dict(), weights)
    validate_job(JobSpec.model_validate(seg_spec(student={"weights": str(weights)})))
    validate_job(JobSpec.model_validate(seg_spec(student={"weights": str(weights)})))
    assert builds.count("seg_tiny_student") == 1

    wide = MODELS.get("seg_tiny_student")(
        MODELS.parse_args("seg_tiny_student", {"base_channels": 24}), 5
    )
    torch.save(wide.state_dict(), weights)
    os.utime(weights, ns=(1, 1))  # a different time even where the clock is coarse
    err = refused(seg_spec(student={"weights": str(weights)}))
    assert err.field == "student.weights" and "wrong shape" in str(err)


def test_a_refused_model_is_not_remembered(builds: list[str]) -> None:
    for _ in range(2):
        err = refused(seg_spec(student={"layers": ["backbone", "no_such_layer"]}))
        assert err.field is not None and err.field.startswith("student.layers")
    assert builds.count("seg_tiny_student") == 2
