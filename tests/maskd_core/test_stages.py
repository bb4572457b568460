from __future__ import annotations

from pathlib import Path

import pytest
import torch
from maskd_core_toys import (
    Recorder,
    ToyFPNNet,
    ToyNet,
    assert_changed,
    assert_same,
    snapshot,
    toy_context,
    toy_plan,
    toy_spec,
)
from torch import nn

from maskd_core.errors import JobCancelled
from maskd_core.stages import run_stage1, run_stage2, train_supervised
from maskd_core.tokens import TokenSet


def no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks for m in module.modules())


@pytest.mark.parametrize("weighting", [False, True])
def test_stage1_trains_only_tokens_and_leaves_the_teacher_bit_identical(
    tmp_path: Path, weighting: bool
) -> None:
    spec = toy_spec(stage1={"mask_weighting": weighting}, eval_every=2)
    torch.manual_seed(0)
    teacher = ToyNet(4)
    plan = toy_plan(teacher, ToyNet(2), spec)
    tokens = TokenSet([lv.teacher_channels for lv in plan.levels], 3, weighting)
    before_teacher, before_tokens = snapshot(teacher), snapshot(tokens)
    recorder = Recorder()
    result = run_stage1(toy_context(spec, recorder), teacher, tokens, plan, tmp_path / "s1.pt")
    assert_same(teacher, before_teacher)
    assert_changed(tokens, before_tokens)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert no_hooks(teacher)
    assert result.step == 4 and (tmp_path / "s1.pt").is_file()
    assert [s for _, s, _ in recorder.steps] == [1, 2, 3, 4]
    assert {"loss", "task_loss", "dice", "lr", "images_per_sec"} <= set(recorder.steps[0][2])
    assert recorder.events == [
        "start stage1 0/4",
        "checkpoint stage1 2",
        "eval stage1 2",
        "checkpoint stage1 4",
        "eval stage1 4",
        "end stage1 4",
    ]


def test_stage1_on_tuple_and_dict_levels(tmp_path: Path) -> None:
    spec = toy_spec(
        teacher={"layers": ["neck"]}, student={"layers": ["neck"]}, stage1={"mask_weighting": True}
    )
    for as_dict in (False, True):
        teacher = ToyFPNNet(4, as_dict=as_dict)
        plan = toy_plan(teacher, ToyFPNNet(2, as_dict=as_dict), spec)
        assert [(lv.level, lv.teacher_shape) for lv in plan.levels] == [
            (0, (4, 16, 16)),
            (1, (4, 8, 8)),
        ]
        tokens = TokenSet([4, 4], 3, True)
        before = snapshot(tokens)
        run_stage1(toy_context(spec), teacher, tokens, plan, None)
        for level in range(2):  # both levels reached the loss
            assert not torch.equal(tokens.level(level).tokens, before[f"{level}.tokens"])


def test_stage2_trains_student_and_aligns_only(tmp_path: Path) -> None:
    spec = toy_spec(stage2={"custom_mask": True, "custom_mask_warmup": 2})
    torch.manual_seed(0)
    teacher, student = ToyNet(4), ToyNet(2)
    plan = toy_plan(teacher, student, spec)
    tokens = TokenSet([4], 3, weighting=True)
    snaps = snapshot(teacher), snapshot(tokens), snapshot(student)
    recorder = Recorder()
    run_stage2(toy_context(spec, recorder), teacher, student, tokens, plan, tmp_path / "s2.pt")
    assert_same(teacher, snaps[0])
    assert_same(tokens, snaps[1])
    assert_changed(student, snaps[2])
    assert all(p.grad is None for p in [*teacher.parameters(), *tokens.parameters()])
    assert no_hooks(teacher) and no_hooks(student)
    saved = torch.load(tmp_path / "s2.pt", weights_only=True)
    align_weight = saved["modules"]["aligns"]["0.weight"]
    assert align_weight.shape == (4, 2, 1, 1)
    assert all(m["kd_loss"] > 0 for _, _, m in recorder.steps)


def test_stage2_identity_align_and_resized_student_levels() -> None:
    spec = toy_spec(
        teacher={"layers": ["stem"]}, student={"layers": ["body"]}, stage2={"align": "identity"}
    )
    teacher, student = ToyNet(3), ToyNet(3)
    plan = toy_plan(teacher, student, spec)
    assert plan.levels[0].teacher_shape == (3, 16, 16)
    assert plan.levels[0].student_shape == (3, 8, 8)
    before = snapshot(student)
    result = run_stage2(toy_context(spec), teacher, student, TokenSet([3], 2, False), plan, None)
    assert result.metrics["kd_loss"] > 0
    assert_changed(student, before)


def test_cancel_writes_a_checkpoint_and_raises(tmp_path: Path) -> None:
    spec = toy_spec()
    model = ToyNet(2)
    recorder = Recorder(stop_at=3)
    with pytest.raises(JobCancelled) as err:
        train_supervised(
            toy_context(spec, recorder),
            model,
            spec.stage2.optimizer,
            10,
            tmp_path / "c.pt",
            "baseline",
        )
    assert (err.value.stage, err.value.step) == ("baseline", 3)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 3
    assert recorder.events[-1] == "checkpoint baseline 3"
