"""Stage-2 methods: each loss against its formula written out densely, what trains, and runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from maskd_core_toys import (
    Recorder,
    ToyNet,
    assert_changed,
    assert_same,
    refused,
    seg_spec,
    snapshot,
    toy_context,
    toy_plan,
    toy_spec,
)
from torch import nn

from maskd_core.errors import JobCancelled, UnknownNameError
from maskd_core.methods import (
    FITNET_LOGITS_WEIGHT,
    FITNET_WEIGHT,
    METHODS,
    MGD_ALPHA,
    AmdDistiller,
    Distiller,
    MethodSetup,
    MgdDistiller,
    build_distiller,
    effective_params,
)
from maskd_core.plan import LevelPlan
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec
from maskd_core.stages import build_aligns, run_stage2, train_supervised
from maskd_core.tokens import TokenSet
from maskd_core.validate import validate_job

ALL = ["maskd", "none", "fitnet", "mgd", "amd"]
# Two levels of different widths and sizes; the second student level is at half the teacher's
# resolution, so the resize to the teacher's H×W is exercised too.
TEACHER_SHAPES = [(6, 8, 8), (5, 4, 4)]
STUDENT_SHAPES = [(6, 8, 8), (5, 2, 2)]


def levels() -> list[LevelPlan]:
    return [
        LevelPlan(0, "t", "s", k, t, s)
        for k, (t, s) in enumerate(zip(TEACHER_SHAPES, STUDENT_SHAPES, strict=True))
    ]


def features(seed: int = 0, n: int = 3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    students = [torch.randn(n, *shape, generator=gen) for shape in STUDENT_SHAPES]
    teachers = [torch.randn(n, *shape, generator=gen) for shape in TEACHER_SHAPES]
    return students, teachers


def upsampled(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)


def distiller(
    name: str,
    params: dict[str, Any] | None = None,
    task: str = "detection",
    num_classes: int = 3,
    **stage2: Any,
) -> Distiller:
    """``num_classes`` 3 matches no level's width: the levels are features, not logits."""
    spec = toy_spec(task=task, stage2={"method": {"name": name, "params": params or {}}, **stage2})
    tokens = TokenSet([shape[0] for shape in TEACHER_SHAPES], 3, weighting=False)
    torch.manual_seed(0)
    setup = MethodSetup(
        levels(), task, spec.stage2.method, tokens.requires_grad_(False), num_classes
    )
    return build_distiller(setup)


def generator_reference(gen: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Conv3×3 → ReLU → Conv3×3 from the generator's weights."""
    first, _, second = gen
    hidden = F.relu(F.conv2d(x, first.weight, first.bias, padding=1))
    return F.conv2d(hidden, second.weight, second.bias, padding=1)


def test_registry_lists_every_method_and_what_it_needs() -> None:
    masked = ["dfmsd", "samkd", "pcd"]  # test_methods_masked.py tests them
    assert METHODS.names() == sorted([*ALL, *masked])
    needs = {entry.name: entry.obj.needs_tokens for entry in METHODS}
    assert needs == {"maskd": True, "none": False, "fitnet": False, "mgd": False, "amd": False} | {
        name: False for name in masked
    }


@pytest.mark.parametrize("custom_step", [(False, 5), (True, 1), (True, 2)])
def test_maskd_sums_the_dense_masked_loss_over_levels(custom_step: tuple[bool, int]) -> None:
    custom, step = custom_step
    method = distiller("maskd", custom_mask=custom, custom_mask_warmup=2, loss_weight=7.0)
    students, teachers = features()
    expected = torch.zeros(())
    for k, (s, t) in enumerate(zip(students, teachers, strict=True)):
        s = upsampled(s, t)
        tokens = method.tokens.level(k).tokens  # type: ignore[union-attr,operator]
        masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", tokens, t))
        if custom and step >= 2:
            masks = masks * torch.sigmoid(torch.einsum("tc,nchw->nthw", tokens, s))
        sq = ((masks[:, :, None] * s[:, None] - masks[:, :, None] * t[:, None]) ** 2).sum((3, 4))
        ratio = sq / (masks.sum((2, 3))[:, :, None] + 1e-6)  # [N,T,C]
        expected = expected + ratio.mean(2).mean(1).mean(0)
    assert method.weight == 7.0
    torch.testing.assert_close(method.loss(students, teachers, step), expected, rtol=1e-5, atol=0)


def test_fitnet_is_the_per_element_mean_squared_error_summed_over_levels() -> None:
    method = distiller("fitnet", {"weight": 0.5})
    students, teachers = features()
    expected = sum(
        ((upsampled(s, t) - t) ** 2).sum() / t.numel()
        for s, t in zip(students, teachers, strict=True)
    )
    assert method.weight == 0.5
    torch.testing.assert_close(method.loss(students, teachers, 0), expected)


@pytest.mark.parametrize(
    ("name", "task", "num_classes", "given", "expected"),
    [
        # Features (no level has one channel per class, or detection): the papers' weights.
        ("fitnet", "segmentation", 3, None, FITNET_WEIGHT),
        ("mgd", "segmentation", 3, None, MGD_ALPHA),
        ("fitnet", "detection", 6, None, FITNET_WEIGHT),
        # A segmentation level with num_classes channels is the logits: FitNet's smaller
        # default; MGD's sum over C·H·W keeps its paper value there.
        ("fitnet", "segmentation", 6, None, FITNET_LOGITS_WEIGHT),
        ("mgd", "segmentation", 5, None, MGD_ALPHA),
        ("amd", "segmentation", 5, None, MGD_ALPHA),
        # A weight the user gives is used as given, on logits too.
        ("fitnet", "segmentation", 6, 1.0, 1.0),
        ("mgd", "segmentation", 6, 2e-5, 2e-5),
    ],
)
def test_fitnet_weight_defaults_by_task_and_tap_and_mgd_keeps_its_own(
    name: str, task: str, num_classes: int, given: float | None, expected: float
) -> None:
    field = "weight" if name == "fitnet" else "alpha"
    params = {} if given is None else {field: given}
    assert distiller(name, params, task=task, num_classes=num_classes).weight == expected
    spec = toy_spec(task=task, stage2={"method": {"name": name, "params": params}})
    setup = MethodSetup(levels(), task, spec.stage2.method, None, num_classes)
    assert effective_params(setup)[field] == expected


def test_mgd_regenerates_the_teacher_from_a_random_mask_summed_over_chw_per_image() -> None:
    method = distiller("mgd")
    assert isinstance(method, MgdDistiller)
    assert (method.weight, method.mask_ratio) == (2e-5, 0.65)
    students, teachers = features()
    torch.manual_seed(7)
    loss = method.loss(students, teachers, 0)
    torch.manual_seed(7)  # the same draws, written out: R = 0 with probability λ
    expected = torch.zeros(())
    for k, (s, t) in enumerate(zip(students, teachers, strict=True)):
        s = upsampled(s, t)
        keep = (torch.rand(s.shape[0], 1, *s.shape[2:]) >= 0.65).float()
        expected = expected + ((generator_reference(method.generators[k], s * keep) - t) ** 2).sum()
    torch.testing.assert_close(loss, expected / 3)


def test_mgd_masks_the_given_share_of_pixels_afresh_each_call() -> None:
    method = distiller("mgd", {"mask_ratio": 0.3})
    assert isinstance(method, MgdDistiller)
    feature = torch.randn(4, 2, 64, 64)
    first, second = method.spatial_mask(feature), method.spatial_mask(feature)
    assert first.shape == (4, 1, 64, 64) and set(first.unique().tolist()) == {0.0, 1.0}
    assert abs((first == 0).float().mean().item() - 0.3) < 0.02
    assert not torch.equal(first, second)


def test_mgd_mask_ratio_defaults_by_task_as_in_the_mgd_configs() -> None:
    for task, ratio in (("detection", 0.65), ("segmentation", 0.75)):
        method = distiller("mgd", task=task)
        assert isinstance(method, MgdDistiller) and method.mask_ratio == ratio


def test_amd_hides_the_most_attended_pixels_and_gates_channels() -> None:
    method = distiller("amd", {"mask_ratio": 0.5, "reduction": 2})
    assert isinstance(method, AmdDistiller)
    students, teachers = features()
    expected = torch.zeros(())
    for k, (s, t) in enumerate(zip(students, teachers, strict=True)):
        s = upsampled(s, t)
        n, _, h, w = s.shape
        keep = torch.ones(n, 1, h, w)
        for i in range(n):
            attention = s[i].abs().mean(0).flatten()
            for pixel in attention.argsort(descending=True)[: (h * w) // 2].tolist():
                keep[i, 0, pixel // w, pixel % w] = 0.0
        generated = generator_reference(method.generators[k], s * keep)
        se = method.channel_adaptive[k]
        pooled = generated.mean((2, 3))
        hidden = F.relu(pooled @ se.squeeze.weight.T + se.squeeze.bias)  # type: ignore[operator]
        gate = torch.sigmoid(hidden @ se.excite.weight.T + se.excite.bias)  # type: ignore[operator]
        expected = expected + ((generated * gate[:, :, None, None] - t) ** 2).sum()
    torch.testing.assert_close(method.loss(students, teachers, 0), expected / 3)


def test_unknown_methods_and_params_are_refused_with_what_exists() -> None:
    err = refused(seg_spec(stage2={"iterations": 2, "method": "mgdd"}))
    assert isinstance(err, UnknownNameError) and err.field == "stage2.method.name"
    assert "'mgd'" in str(err) and all(name in str(err) for name in ALL)
    err = refused(seg_spec(stage2={"iterations": 2, "method": {"name": "mgd", "params": {"a": 1}}}))
    assert err.field == "stage2.method.params"
    assert "Allowed arguments: alpha, mask_ratio" in str(err)
    err = refused(
        seg_spec(stage2={"iterations": 2, "method": {"name": "maskd", "params": {"x": 1}}})
    )
    assert err.field == "stage2.method.params"
    assert "Allowed arguments: loss_weight, custom_mask, custom_mask_warmup, mask_eps" in str(err)


def test_maskd_settings_are_its_params_and_their_old_place_in_stage2_still_works() -> None:
    old = JobSpec.model_validate(seg_spec(stage2={"loss_weight": 7, "mask_eps": 1e-3}))
    new = JobSpec.model_validate(
        seg_spec(
            stage2={"method": {"name": "maskd", "params": {"loss_weight": 7, "mask_eps": 1e-3}}}
        )
    )
    assert old == new
    assert old.stage2.method.params == {"custom_mask": False, "loss_weight": 7, "mask_eps": 1e-3}
    detection = toy_spec(task="detection")
    assert detection.stage2.method.params == {"custom_mask": True}
    with pytest.raises(ValueError, match="given twice"):
        maskd = {"name": "maskd", "params": {"loss_weight": 3}}
        JobSpec.model_validate(seg_spec(stage2={"loss_weight": 7, "method": maskd}))


def test_maskd_settings_beside_another_method_are_refused_unless_at_their_defaults() -> None:
    with pytest.raises(ValueError, match=r"stage2.loss_weight is a MasKD setting"):
        JobSpec.model_validate(seg_spec(stage2={"method": "mgd", "loss_weight": 7}))
    with pytest.raises(ValueError, match=r"stage2.custom_mask is a MasKD setting"):
        JobSpec.model_validate(seg_spec(stage2={"method": "mgd", "custom_mask": True}))
    # Specs stored before MasKD's settings moved spell out their defaults: still valid.
    legacy = {"method": "fitnet", "loss_weight": 1.0, "custom_mask": False, "mask_eps": 1e-6}
    spec = JobSpec.model_validate(seg_spec(stage2=legacy))
    assert spec.stage2.method.params == {}


def test_a_stored_spec_with_defaults_spelled_out_still_validates() -> None:
    """The job store saves specs with every default filled in; a worker reads them back."""
    for method in ("fitnet", "maskd"):
        spec = JobSpec.model_validate(seg_spec(stage2={"iterations": 2, "method": method}))
        again = JobSpec.model_validate(spec.model_dump(mode="json"))
        assert again == spec
        validate_job(again)


def test_method_defaults_to_maskd_and_a_bare_name_is_accepted() -> None:
    assert toy_spec().stage2.method.name == "maskd"
    spec = toy_spec(stage2={"method": "fitnet"})
    assert (spec.stage2.method.name, spec.stage2.method.params) == ("fitnet", {})


def trained(
    name: str, tmp_path: Path, params: dict[str, Any] | None = None
) -> tuple[Recorder, dict[str, dict[str, torch.Tensor]], dict[str, nn.Module]]:
    """A short stage 2 with ``name``: its steps, every module's state before, the modules after.

    The aligns and the method's modules are built inside stage 2 from the job's seed; they are
    rebuilt here the same way for their initial states.
    """
    spec = toy_spec(stage2={"method": {"name": name, "params": params or {}}})
    torch.manual_seed(0)
    teacher, student = ToyNet(4), ToyNet(2)
    tokens = TokenSet([4], 3, weighting=True)
    plan = toy_plan(teacher, student, spec)
    modules: dict[str, nn.Module] = {"teacher": teacher, "student": student, "tokens": tokens}
    before = {key: snapshot(module) for key, module in modules.items()}
    torch.manual_seed(spec.seed)
    before["aligns"] = snapshot(build_aligns(plan, spec.stage2.align))
    setup = MethodSetup(plan.levels, spec.task, spec.stage2.method, tokens, plan.num_classes)
    before["method"] = {
        k: v for k, v in snapshot(build_distiller(setup)).items() if not k.startswith("tokens.")
    }
    recorder = Recorder()
    run_stage2(toy_context(spec, recorder), teacher, student, tokens, plan, tmp_path / "s2.pt")
    return recorder, before, modules


def changed(state: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> set[str]:
    assert set(state) == set(before)
    return {k for k, v in state.items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("name", ALL)
def test_only_the_student_aligns_and_method_modules_train(name: str, tmp_path: Path) -> None:
    extras = name in ("mgd", "amd")
    recorder, before, modules = trained(name, tmp_path, {"alpha": 1e-2} if extras else None)
    assert_same(modules["teacher"], before["teacher"])
    assert_same(modules["tokens"], before["tokens"])
    assert all(p.grad is None for key in ("teacher", "tokens") for p in modules[key].parameters())
    assert_changed(modules["student"], before["student"])
    saved = torch.load(tmp_path / "s2.pt", weights_only=True)["modules"]
    assert set(saved) == {"student", "aligns"} | ({"method"} if extras else set())
    assert changed(saved["aligns"], before["aligns"]) == (
        set() if name == "none" else {"0.weight", "0.bias"}
    )
    if extras:
        assert changed(saved["method"], before["method"]) == set(before["method"])
    for _, _, metrics in recorder.steps:
        assert metrics["loss"] > 0 and metrics["kd_loss"] >= 0
        if name != "none":
            assert metrics["kd_loss"] > 0


def test_none_trains_exactly_like_the_task_loss_alone(tmp_path: Path) -> None:
    recorder, _, modules = trained("none", tmp_path)
    assert all(m["loss"] == m["task_loss"] and m["kd_loss"] == 0 for _, _, m in recorder.steps)
    spec = toy_spec()
    torch.manual_seed(0)
    ToyNet(4)
    plain = ToyNet(2)
    train_supervised(
        toy_context(spec), plain, spec.stage2.optimizer, spec.stage2.iterations, None, "baseline"
    )
    assert_same(modules["student"], snapshot(plain))


def test_mgd_resumes_with_its_generators_and_mask_draws(tmp_path: Path) -> None:
    spec = toy_spec(stage2={"iterations": 6, "method": {"name": "mgd", "params": {"alpha": 1e-2}}})

    def run(ckpt: Path, recorder: Recorder | None = None) -> nn.Module:
        torch.manual_seed(1)
        teacher, student = ToyNet(4, dropout=0.0), ToyNet(2, dropout=0.3)
        plan = toy_plan(teacher, student, spec)
        run_stage2(toy_context(spec, recorder), teacher, student, None, plan, ckpt)
        return student

    reference = run(tmp_path / "straight.pt")
    with pytest.raises(JobCancelled):
        run(tmp_path / "resumed.pt", Recorder(stop_at=3))
    torch.manual_seed(1234)
    resumed = run(tmp_path / "resumed.pt")
    for (key, value), other in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ALL)
def test_a_job_runs_with_every_method_on_the_procedural_data(name: str, tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        seg_spec(stage1={"iterations": 1}, stage2={"iterations": 2, "method": name})
    )
    result = run_job(spec, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == name
    assert 0.0 <= summary["metrics"]["student_miou"] <= 1.0
    assert (result.tokens_path is not None) == (name == "maskd")
    assert (tmp_path / "tokens.pt").is_file() == (name == "maskd")
    assert ("masked_teacher_miou" in summary["metrics"]) == (name == "maskd")
    assert summary["steps"]["stage1"] == (1 if name == "maskd" else 0)
