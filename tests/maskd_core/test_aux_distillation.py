"""MasKD's ``aux_weight``: the auxiliary heads' logits distilled through the main logits' tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from maskd_core.callbacks import Callback, Stage
from maskd_core.errors import SpecError
from maskd_core.methods import MaskdDistiller, MethodSetup, build_distiller
from maskd_core.models.segmentation import AUX_CLASSIFIER
from maskd_core.plan import AuxPlan, LevelPlan
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec, MethodSpec
from maskd_core.tokens import TokenSet
from maskd_core.validate import validate_job

CLASSES = 3
AUX_WEIGHT = 0.4


def distiller(aux_weight: float | None = AUX_WEIGHT) -> MaskdDistiller:
    """MasKD over two levels (a feature with 5 channels, then the logits); aux on the logits'
    tokens, level 1."""
    shape = (CLASSES, 4, 4)
    levels = [
        LevelPlan(0, "backbone", "backbone", 0, (5, 4, 4), (5, 4, 4)),
        LevelPlan(1, "classifier", "classifier", 0, shape, shape),
    ]
    torch.manual_seed(0)
    tokens = TokenSet([5, CLASSES], num_tokens=2, weighting=False)
    with torch.no_grad():
        for parameter in tokens.parameters():
            parameter.normal_()  # visible masks, not the init's near-0.5 ones
    params: dict[str, Any] = {} if aux_weight is None else {"aux_weight": aux_weight}
    built = build_distiller(
        MethodSetup(
            levels,
            "segmentation",
            MethodSpec(name="maskd", params=params),
            tokens,
            CLASSES,
            AuxPlan(AUX_CLASSIFIER, shape, shape, tokens_level=1),
        )
    )
    assert isinstance(built, MaskdDistiller)
    return built


def dense_reference(
    tokens: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, eps: float
) -> torch.Tensor:
    """The official segmentation loss written out on [N,T,C,H,W] tensors (without its 0.5)."""
    masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", tokens, teacher))
    masked_student = student[:, None] * masks[:, :, None]
    masked_teacher = teacher[:, None] * masks[:, :, None]
    error = (masked_student - masked_teacher).pow(2).sum(dim=(3, 4))  # [N,T,C]
    return (error / (masks.sum(dim=(2, 3))[:, :, None] + eps)).mean()


def test_the_aux_loss_is_zero_when_the_heads_agree() -> None:
    teacher = torch.randn(2, CLASSES, 4, 4)
    assert float(distiller().aux_loss(teacher.clone(), teacher, step=0).detach()) == 0.0


def test_the_aux_loss_is_the_dense_formula_through_the_logits_tokens() -> None:
    method = distiller()
    torch.manual_seed(1)
    student, teacher = torch.randn(2, CLASSES, 4, 4), torch.randn(2, CLASSES, 4, 4)
    logits_tokens = method.tokens.level(1).tokens.detach()
    expected = AUX_WEIGHT * dense_reference(logits_tokens, student, teacher, method.eps)
    assert torch.allclose(method.aux_loss(student, teacher, step=0), expected, rtol=1e-5)


def test_the_aux_loss_pulls_the_student_logits_towards_the_teachers() -> None:
    method = distiller()
    teacher = torch.randn(2, CLASSES, 4, 4)
    student = torch.randn(2, CLASSES, 4, 4, requires_grad=True)
    loss = method.aux_loss(student, teacher, step=0)
    torch.autograd.backward(loss)
    assert student.grad is not None
    stepped = (student - 0.1 * student.grad).detach()
    assert float(method.aux_loss(stepped, teacher, step=0).detach()) < float(loss.detach())


def test_without_aux_weight_nothing_is_tapped() -> None:
    assert distiller(aux_weight=None).aux_layer is None
    assert distiller().aux_layer == AUX_CLASSIFIER


def r18_spec(teacher_args: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """The paper's pairing at the smallest size: two ResNet-18 DeepLabV3s on 32 px images."""
    aux = {"aux_loss": True}
    spec: dict[str, Any] = {
        "teacher": {
            "arch": "deeplabv3_resnet18",
            "args": teacher_args or aux,
            "layers": ["classifier"],
        },
        "student": {"arch": "deeplabv3_resnet18", "args": aux, "layers": ["classifier"]},
        "dataset": {"name": "procedural_shapes", "args": {"num_samples": 4, "image_size": 32}},
        "stage1": {"iterations": 1},
        "stage2": {
            "iterations": 2,
            "align": "identity",
            "method": {"name": "maskd", "params": {"aux_weight": AUX_WEIGHT}},
        },
        "device": "cpu",
        "batch_size": 2,
    }
    return {**spec, **overrides}


def refused(spec: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as err:
        validate_job(JobSpec.model_validate(spec))
    return err.value


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_aux_weight_is_refused_for_a_model_without_aux_head(role: str) -> None:
    spec = r18_spec()
    spec[role] = {**spec[role], "args": {"aux_loss": False}}
    error = refused(spec)
    assert error.field == "stage2.method.params.aux_weight"
    assert f"the {role} (deeplabv3_resnet18" in str(error) and "aux_loss: true" in str(error)


def test_aux_weight_is_refused_for_models_that_have_no_aux_head_at_all() -> None:
    spec = r18_spec()
    for role in ("teacher", "student"):
        spec[role] = {"arch": f"seg_tiny_{role}", "layers": ["head"]}
    assert refused(spec).field == "stage2.method.params.aux_weight"


def test_aux_weight_needs_the_main_logits_among_the_distilled_levels() -> None:
    spec = r18_spec()
    for role in ("teacher", "student"):
        spec[role] = {**spec[role], "layers": ["backbone.layer4"]}
    error = refused(spec)
    assert error.field == "stage2.method.params.aux_weight"
    assert "tap the teacher's classifier" in str(error)


def test_a_comparison_entry_is_named_in_the_refusal() -> None:
    spec = r18_spec(teacher_args={"aux_loss": False})
    spec["comparison"] = {
        "methods": ["none", {"name": "maskd", "params": {"aux_weight": AUX_WEIGHT}}],
        "seeds": [0],
    }
    assert refused(spec).field == "comparison.methods[1].params.aux_weight"


def test_aux_weight_is_a_method_param_not_a_stage2_field() -> None:
    spec = r18_spec()
    spec["stage2"] = {**spec["stage2"], "aux_weight": AUX_WEIGHT}
    with pytest.raises(ValidationError, match="aux_weight"):
        JobSpec.model_validate(spec)


def test_the_plan_pairs_the_aux_heads_with_the_logits_tokens() -> None:
    plan = validate_job(JobSpec.model_validate(r18_spec()))
    assert plan.aux == AuxPlan(AUX_CLASSIFIER, (5, 4, 4), (5, 4, 4), tokens_level=0)
    assert plan.to_dict()["aux"]["tokens_level"] == 0


class Steps(Callback):
    def __init__(self) -> None:
        self.metrics: dict[str, list[dict[str, float]]] = {}

    def on_step(self, stage: Stage, step: int, metrics: Any) -> None:
        self.metrics.setdefault(str(stage), []).append(dict(metrics))


def test_a_stage2_run_distils_the_aux_heads(tmp_path: Path) -> None:
    steps = Steps()
    result = run_job(JobSpec.model_validate(r18_spec()), tmp_path, [steps])
    stage2 = steps.metrics["stage2"]
    assert len(stage2) == 2
    for metrics in stage2:
        assert 0.0 < metrics["kd_aux_loss"] < metrics["kd_loss"]
    assert result.runs[0].summary["plan"]["aux"]["layer"] == AUX_CLASSIFIER
