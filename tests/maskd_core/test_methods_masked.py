"""DFMSD, SAMKD and PCD: each loss against its formulas written out with loops, gradients, the
params and taps they refuse, and a short job with each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from maskd_core_toys import refused, seg_spec, toy_spec
from torch import nn

from maskd_core.errors import SpecError
from maskd_core.methods import (
    METHODS,
    Distiller,
    build_distiller,
    effective_params,
    method_setup,
)
from maskd_core.methods_base import MethodSetup
from maskd_core.methods_masked import (
    SAMKD_LOGITS_WEIGHT,
    SAMKD_WEIGHT,
    DfmsdDistiller,
    PcdDistiller,
    SamkdDistiller,
)
from maskd_core.plan import LevelPlan
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job

CLASSES = 5
# A feature level, then a logits level (CLASSES channels) whose student is at half resolution,
# so the resize to the teacher's H×W is exercised; H=W=6 with a grid of 4 gives uneven regions.
TEACHER_SHAPES = [(4, 6, 6), (CLASSES, 4, 4)]
STUDENT_SHAPES = [(4, 6, 6), (CLASSES, 2, 2)]


def levels(shapes: list[int] | None = None) -> list[LevelPlan]:
    chosen = range(len(TEACHER_SHAPES)) if shapes is None else shapes
    return [LevelPlan(k, f"t{k}", f"s{k}", 0, TEACHER_SHAPES[k], STUDENT_SHAPES[k]) for k in chosen]


def features(
    which: list[int] | None = None, seed: int = 0, n: int = 2
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    chosen = range(len(TEACHER_SHAPES)) if which is None else which
    gen = torch.Generator().manual_seed(seed)
    students = [torch.randn(n, *STUDENT_SHAPES[k], generator=gen) for k in chosen]
    teachers = [torch.randn(n, *TEACHER_SHAPES[k], generator=gen) for k in chosen]
    return students, teachers


def build(
    name: str,
    params: dict[str, Any] | None = None,
    which: list[int] | None = None,
    task: str = "segmentation",
    iterations: int = 0,
) -> Distiller:
    spec = toy_spec(task=task, stage2={"method": {"name": name, "params": params or {}}})
    torch.manual_seed(0)
    setup = MethodSetup(
        levels(which), task, spec.stage2.method, None, CLASSES, iterations=iterations
    )
    return build_distiller(setup)


def upsampled(student: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(student, size=size, mode="bilinear", align_corners=False)


def generate(gen: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Conv3×3 → ReLU → Conv3×3 from the generator's weights."""
    first, _, second = gen
    hidden = torch.relu(torch.nn.functional.conv2d(x, first.weight, first.bias, padding=1))
    return torch.nn.functional.conv2d(hidden, second.weight, second.bias, padding=1)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def spatial_attention_loops(t: torch.Tensor, temperature: float) -> list[list[list[float]]]:
    """[n][h][w]: H·W · softmax over the pixels of mean_c |F| / T."""
    n, c, h, w = t.shape
    out = []
    for i in range(n):
        energy = [
            float(t[i, :, y, x].abs().sum()) / c / temperature for y in range(h) for x in range(w)
        ]
        probs = softmax(energy)
        out.append([[h * w * probs[y * w + x] for x in range(w)] for y in range(h)])
    return out


def channel_attention_loops(t: torch.Tensor, temperature: float) -> list[list[float]]:
    """[n][c]: C · softmax over the channels of mean_hw |F| / T."""
    n, c = t.shape[:2]
    return [
        [c * p for p in softmax([float(t[i, k].abs().mean()) / temperature for k in range(c)])]
        for i in range(n)
    ]


def standardised_loops(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for k in range(x.shape[1]):
            values = x[i, k]
            mean = values.sum() / values.numel()
            var = ((values - mean) ** 2).sum() / values.numel()
            out[i, k] = (values - mean) / torch.sqrt(var + 1e-5)
    return out


# ----------------------------------------------------------------------------------------------
# DFMSD


@pytest.mark.parametrize(("step", "progress"), [(0, 1 / 3), (4, 2 / 3), (8, 1.0), (99, 1.0)])
def test_dfmsd_is_the_dual_masked_stagewise_loss_written_out(step: int, progress: float) -> None:
    params = {"spatial_ratio": 0.4, "channel_ratio": 0.25, "enhancement": 0.7, "weight": 2.0}
    method = build("dfmsd", params, iterations=9)
    assert isinstance(method, DfmsdDistiller) and method.weight == 2.0
    students, teachers = features()
    expected = torch.zeros(())
    for k, (s, t) in enumerate(zip(students, teachers, strict=True)):
        n, c, h, w = t.shape
        s = standardised_loops(upsampled(s, (h, w)))
        target = progress * standardised_loops(t) + (1 - progress) * s
        spatial = spatial_attention_loops(t, 0.5)
        channel = channel_attention_loops(t, 0.5)
        keep = torch.ones(n, c, h, w)
        for i in range(n):
            pixels = sorted((spatial[i][y][x], y, x) for y in range(h) for x in range(w))
            for _, y, x in pixels[: math.floor(0.4 * h * w)]:
                keep[i, :, y, x] = 0.0
            for _, kk in sorted((channel[i][kk], kk) for kk in range(c))[: math.floor(0.25 * c)]:
                keep[i, kk] = 0.0
        generated = standardised_loops(generate(method.generators[k], s * keep))
        total = torch.zeros(())
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    weight = 1 + 0.7 * progress * spatial[i][y][x]
                    total = (
                        total + weight * ((generated[i, :, y, x] - target[i, :, y, x]) ** 2).sum()
                    )
        expected = expected + total / (n * c * h * w)
    torch.testing.assert_close(
        method.loss(students, teachers, step), expected, rtol=1e-4, atol=1e-6
    )


def test_dfmsd_without_a_known_length_distils_towards_the_teacher_alone() -> None:
    method = build("dfmsd")
    assert isinstance(method, DfmsdDistiller)
    assert method.progress(0) == 1.0


# ----------------------------------------------------------------------------------------------
# SAMKD


def regions_of(h: int, w: int, grid: int) -> dict[int, list[tuple[int, int]]]:
    cells: dict[int, list[tuple[int, int]]] = {}
    for y in range(h):
        for x in range(w):
            cells.setdefault((y * grid // h) * grid + x * grid // w, []).append((y, x))
    return cells


def test_samkd_is_the_pyramid_masked_and_region_weighted_logit_loss_written_out() -> None:
    params = {"grids": [1, 2, 4], "mask_ratio": 0.5, "logit_weight": 0.3, "logit_temperature": 2.0}
    method = build("samkd", params)
    assert isinstance(method, SamkdDistiller)
    students, teachers = features()
    expected = torch.zeros(())
    for k, (s, t) in enumerate(zip(students, teachers, strict=True)):
        n, c, h, w = t.shape
        s = upsampled(s, (h, w))
        spatial = spatial_attention_loops(t, 0.5)
        channel = channel_attention_loops(t, 0.5)
        sfd = torch.zeros(())
        for grid in (1, 2, 4):
            keep = torch.ones(n, 1, h, w)
            for i in range(n):
                for pixels in regions_of(h, w, grid).values():
                    ranked = sorted(pixels, key=lambda p: -spatial[i][p[0]][p[1]])
                    for y, x in ranked[: math.floor(0.5 * len(pixels))]:
                        keep[i, 0, y, x] = 0.0
            generated = generate(method.generators[k], s * keep)
            error = torch.zeros(())
            for i in range(n):
                for kk in range(c):
                    error = error + channel[i][kk] * ((generated[i, kk] - t[i, kk]) ** 2).sum()
            sfd = sfd + error / (n * c * h * w)
        expected = expected + sfd / 3
        if c != CLASSES:
            continue
        sld = torch.zeros(())
        for i in range(n):
            gap = [
                [float(((s[i, :, y, x] - t[i, :, y, x]) ** 2).mean()) for x in range(w)]
                for y in range(h)
            ]
            region_mean = {
                cell: sum(gap[y][x] for y, x in pixels) / len(pixels)
                for cell, pixels in regions_of(h, w, 4).items()
            }
            weights = [[0.0] * w for _ in range(h)]
            for cell, pixels in regions_of(h, w, 4).items():
                for y, x in pixels:
                    weights[y][x] = region_mean[cell]
            scale = sum(map(sum, weights)) / (h * w)
            for y in range(h):
                for x in range(w):
                    p = softmax([float(v) / 2.0 for v in t[i, :, y, x]])
                    log_q = torch.log_softmax(s[i, :, y, x] / 2.0, dim=0)
                    kl = sum(p[j] * (math.log(p[j]) - log_q[j]) for j in range(c))
                    sld = sld + weights[y][x] / scale * kl
        expected = expected + 0.3 * 4.0 * sld / (n * h * w)
    torch.testing.assert_close(method.loss(students, teachers, 0), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("task", "which", "weight"),
    [
        ("segmentation", [0], SAMKD_WEIGHT),
        ("segmentation", [0, 1], SAMKD_LOGITS_WEIGHT),
        ("detection", [1], SAMKD_WEIGHT),  # detection taps are never logits
    ],
)
def test_samkd_weight_follows_the_taps_and_its_logit_term_only_logits(
    task: str, which: list[int], weight: float
) -> None:
    method = build("samkd", which=which, task=task)
    assert isinstance(method, SamkdDistiller)
    assert method.weight == weight
    assert method.logit_levels == [task == "segmentation" and k == 1 for k in which]
    spec = toy_spec(task=task, stage2={"method": "samkd"})
    setup = MethodSetup(levels(which), task, spec.stage2.method, None, CLASSES)
    assert effective_params(setup)["weight"] == weight


# ----------------------------------------------------------------------------------------------
# PCD


def pcd_stage_loops(s: list[float], t: list[float], groups: int, tau: float) -> float:
    """One pixel's Σ_groups τ²·(1 − cos(p, q))·KL(p‖q) with its classes ranked by |t − s|."""
    classes = len(t)
    ranked = sorted(range(classes), key=lambda j: -abs(t[j] - s[j]))
    size = classes // groups
    total = 0.0
    for g in range(groups):
        members = ranked[g * size : (g + 1) * size if g < groups - 1 else classes]
        p = softmax([t[j] / tau for j in members])
        q = softmax([s[j] / tau for j in members])
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        dot = sum(pi * qi for pi, qi in zip(p, q, strict=True))
        cos = dot / math.sqrt(sum(pi * pi for pi in p) * sum(qi * qi for qi in q))
        total += tau * tau * (1 - cos) * kl
    return total


@pytest.mark.parametrize(
    ("schedule", "step", "stages"),
    [
        ("every_step", 0, [3, 2, 1, 1, 2, 3]),
        ("progressive", 0, [3]),  # 12 steps in 6 phases of 2: fine-to-coarse 3, 2, 1 ...
        ("progressive", 5, [1]),
        ("progressive", 6, [1]),  # ... then coarse-to-fine 1, 2, 3
        ("progressive", 11, [3]),
    ],
)
def test_pcd_is_the_ranked_grouped_kl_of_its_stages_written_out(
    schedule: str, step: int, stages: list[int]
) -> None:
    params = {"alpha": 0.5, "temperature": 2.0, "stages": 3, "schedule": schedule}
    method = build("pcd", params, which=[1], iterations=12)
    assert isinstance(method, PcdDistiller) and method.weight == 0.5
    (s,), (t,) = features([1])
    s = upsampled(s, t.shape[-2:])
    n, _, h, w = t.shape
    pixels = [
        (s[i, :, y, x].tolist(), t[i, :, y, x].tolist())
        for i in range(n)
        for y in range(h)
        for x in range(w)
    ]
    expected = sum(
        sum(pcd_stage_loops(ps, pt, g, 2.0) for ps, pt in pixels) / len(pixels) for g in stages
    )
    (s_in,), (t_in,) = features([1])
    loss = method.loss([s_in], [t_in], step)
    torch.testing.assert_close(
        loss, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-6
    )


def test_pcd_warms_up_linearly_over_its_steps() -> None:
    method = build("pcd", {"warmup_steps": 4}, which=[1])
    students, teachers = features([1])
    full = method.loss(students, teachers, 10)
    torch.testing.assert_close(method.loss(students, teachers, 0), full / 4)
    torch.testing.assert_close(method.loss(students, teachers, 3), full)


# ----------------------------------------------------------------------------------------------
# All three


@pytest.mark.parametrize(("name", "which"), [("dfmsd", None), ("samkd", None), ("pcd", [1])])
def test_gradients_reach_the_student_and_the_methods_own_modules(
    name: str, which: list[int] | None
) -> None:
    method = build(name, which=which)
    students, teachers = features(which)
    students = [s.requires_grad_(True) for s in students]
    method.loss(students, teachers, 0).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert all(not t.requires_grad for t in teachers)


def test_the_registry_lists_them_without_stage_1() -> None:
    assert {"dfmsd", "samkd", "pcd"} <= set(METHODS.names())
    assert not any(METHODS.get(name).needs_tokens for name in ("dfmsd", "samkd", "pcd"))


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"name": "dfmsd", "params": {"spatial_ratio": 1.0}}, "spatial_ratio"),
        ({"name": "dfmsd", "params": {"stages": 0}}, "stages"),
        ({"name": "samkd", "params": {"grids": []}}, "grids"),
        ({"name": "samkd", "params": {"temperature": 0}}, "temperature"),
        ({"name": "pcd", "params": {"schedule": "backwards"}}, "schedule"),
        ({"name": "pcd", "params": {"beta": 1}}, "Allowed arguments: alpha, temperature"),
    ],
)
def test_bad_params_are_refused_at_their_field(method: dict[str, Any], message: str) -> None:
    err = refused(seg_spec(stage2={"method": method}))
    assert err.field == "stage2.method.params"
    assert message in str(err)


def test_pcd_refuses_taps_that_are_not_logits_naming_the_layer() -> None:
    err = refused(seg_spec(stage2={"method": "pcd"}))  # taps backbone (features) and head
    assert err.field == "teacher.layers[0]"
    assert "'backbone'" in str(err) and "stage2.method 'pcd' distils class logits" in str(err)
    comparison = {**seg_spec(), "comparison": {"methods": ["fitnet", "pcd"], "seeds": [0]}}
    err = refused(comparison)
    assert err.field == "teacher.layers[0]" and "comparison.methods[1] 'pcd'" in str(err)
    with pytest.raises(SpecError, match="class logits"):
        build("pcd", task="detection", which=[1])  # a detector's taps are never logits


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dfmsd", "samkd", "pcd"])
def test_a_job_runs_with_each_method_on_the_procedural_data(name: str, tmp_path: Path) -> None:
    layers = ["head"] if name == "pcd" else ["backbone", "head"]
    spec = JobSpec.model_validate(
        seg_spec(
            teacher={"layers": layers},
            student={"layers": layers},
            stage2={"iterations": 3, "method": name},
        )
    )
    run_job(spec, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == name
    assert summary["steps"]["stage1"] == 0 and not (tmp_path / "tokens.pt").exists()
    assert 0.0 <= summary["metrics"]["student_miou"] <= 1.0
    assert summary["method_params"] == effective_params_of(spec)


def effective_params_of(spec: JobSpec) -> dict[str, Any]:
    return effective_params(method_setup(spec, validate_job(spec), spec.stage2.method, None))


DETECTOR = {
    "arch": "fcos",
    "layers": ["backbone"],
    "args": {"backbone": "tiny", "min_size": 64, "max_size": 64},
}
BOXES = {"num_samples": 8, "image_size": 64, "max_object_size": 24}


def detection_body(**extra: Any) -> dict[str, Any]:
    return {
        "task": "detection",
        "teacher": DETECTOR,
        "student": DETECTOR,
        "dataset": {"name": "procedural_boxes", "args": BOXES, "val_fraction": 0.25},
        "stage2": {"iterations": 2},
        "batch_size": 2,
        "device": "cpu",
        **extra,
    }


@pytest.mark.slow
def test_dfmsd_and_samkd_distil_a_detectors_fpn_levels_and_pcd_refuses_them(
    tmp_path: Path,
) -> None:
    err = refused(detection_body(stage2={"iterations": 2, "method": "pcd"}))
    assert err.field == "teacher.layers[0]" and "class logits" in str(err)
    spec = JobSpec.model_validate(
        detection_body(comparison={"methods": ["dfmsd", "samkd"], "seeds": [0]})
    )
    result = run_job(spec, tmp_path)
    assert result.comparison is not None
    for name in ("dfmsd", "samkd"):
        summary = json.loads((tmp_path / "runs" / f"{name}-seed0" / "summary.json").read_text())
        assert summary["method"] == name and "student_map" in summary["metrics"]
