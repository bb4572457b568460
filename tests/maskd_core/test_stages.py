from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from maskd_core_toys import (
    Recorder,
    ToyFPNNet,
    ToyNet,
    ToySegTask,
    assert_changed,
    assert_same,
    snapshot,
    toy_context,
    toy_plan,
    toy_spec,
)
from torch import nn

from maskd_core.callbacks import Stage
from maskd_core.errors import DataError, JobCancelled, TrainingDiverged
from maskd_core.spec import JobSpec
from maskd_core.stages import (
    FP16_NONFINITE_STEPS,
    NonFiniteStreak,
    TrainContext,
    run_stage1,
    run_stage2,
    train_supervised,
)
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


class SpikingTask(ToySegTask):
    """The toy task whose loss is +inf on the given (1-based) calls of ``training_loss``.

    The spike is a constant added to the loss, so the gradients stay finite and the weights
    unharmed: only the divergence rule can stop the run.
    """

    def __init__(self, spikes: range) -> None:
        self.spikes = spikes
        self.calls = 0

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = super().training_loss(model, batch)
        self.calls += 1
        return (loss + math.inf if self.calls in self.spikes else loss), parts


def spiking_context(
    spec: JobSpec, spikes: range, callbacks: Recorder | None = None
) -> TrainContext:
    """The toy context with ``SpikingTask``, on CUDA when there is one (fp16's scaler needs it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dataclasses.replace(
        toy_context(spec, callbacks), task=SpikingTask(spikes), device=device
    )


@pytest.mark.parametrize(
    ("method", "field", "stage", "named"),
    [
        ("maskd", "loss_weight", Stage("stage2"), "stage2.method.params.loss_weight = 1000"),
        ("fitnet", "weight", Stage("stage2"), "stage2.method.params.weight = 1000"),
        (
            "mgd",
            "alpha",
            Stage.comparison_run("mgd", 1),
            "comparison.methods[name=mgd].params.alpha = 1000",
        ),
    ],
)
def test_an_absurd_learning_rate_fails_as_diverged_naming_lr_and_loss_weight(
    method: str, field: str, stage: Stage, named: str
) -> None:
    spec = toy_spec(
        stage2={"optimizer": {"lr": 1e30}, "method": {"name": method, "params": {field: 1000.0}}}
    )
    torch.manual_seed(0)
    teacher, student = ToyNet(4), ToyNet(2)
    plan = toy_plan(teacher, student, spec)
    tokens = TokenSet([4], 3, weighting=False) if method == "maskd" else None
    with pytest.raises(TrainingDiverged) as caught:
        run_stage2(toy_context(spec), teacher, student, tokens, plan, None, stage)
    error = caught.value
    assert not isinstance(error, DataError), "a diverged loss is not the data's fault"
    assert (error.stage, error.step, error.steps) == (str(stage), 2, 1)
    assert math.isnan(error.loss) and error.nonfinite == ("task_loss", "kd_loss")
    message = str(error)
    assert message.startswith(f"training diverged at {stage} step 2: the loss is nan")
    assert f"Lower the learning rate stage2.optimizer.lr = 1e+30 and the loss weight {named}," in (
        message
    )
    assert f"e.g. by 10x (lr 1e+29, {field} 100)" in message
    assert message.endswith("to bound each update, also set stage2.optimizer.grad_clip (e.g. 1.0)")


def test_a_diverged_stage1_names_its_own_optimizer_and_no_loss_weight() -> None:
    spec = toy_spec(stage1={"optimizer": {"name": "adam", "lr": 0.01, "grad_clip": 5.0}})
    teacher = ToyNet(4)
    plan = toy_plan(teacher, ToyNet(2), spec)
    with pytest.raises(TrainingDiverged) as caught:
        run_stage1(spiking_context(spec, range(3, 4)), teacher, TokenSet([4], 3, False), plan, None)
    assert str(caught.value) == (
        "training diverged at stage1 step 3: the loss is inf (non-finite: task_loss). Lower the "
        "learning rate stage1.optimizer.lr = 0.01, e.g. by 10x (lr 0.001); to bound each update, "
        "also lower stage1.optimizer.grad_clip = 5"
    )


def test_a_nonfinite_streak_diverges_at_its_limit_and_restarts_after_a_finite_loss() -> None:
    streak = NonFiniteStreak(3)
    losses = [math.inf, math.nan, 1.0, math.nan, -math.inf]
    assert [streak.diverged(loss) for loss in losses] == [False] * 5
    assert streak.diverged(math.nan) and streak.length == 3
    assert not NonFiniteStreak(1).diverged(0.5)
    assert NonFiniteStreak(1).diverged(math.inf)


@pytest.mark.filterwarnings("ignore:.*CUDA is not available:UserWarning")
@pytest.mark.parametrize("limit_reached", [False, True])
def test_fp16_skips_nonfinite_losses_until_a_streak_of_them_diverges(limit_reached: bool) -> None:
    """Under fp16 (its GradScaler skips steps) only FP16_NONFINITE_STEPS in a row are fatal.

    On a machine without CUDA the scaler disables itself; the rule is the loop's either way.
    """
    iterations = FP16_NONFINITE_STEPS + 3
    spikes = range(2, 2 + FP16_NONFINITE_STEPS - (0 if limit_reached else 1))
    spec = toy_spec(mixed_precision="fp16")
    recorder = Recorder()
    ctx = spiking_context(spec, spikes, recorder)
    optimizer = spec.stage2.optimizer
    if not limit_reached:
        result = train_supervised(ctx, ToyNet(2), optimizer, iterations, None, Stage("baseline"))
        assert result.step == iterations
        assert sum(not math.isfinite(m["loss"]) for _, _, m in recorder.steps) == len(spikes)
        return
    with pytest.raises(TrainingDiverged) as caught:
        train_supervised(ctx, ToyNet(2), optimizer, iterations, None, Stage("baseline"))
    error = caught.value
    assert (error.step, error.steps) == (1 + FP16_NONFINITE_STEPS, FP16_NONFINITE_STEPS)
    assert f"baseline step {error.step} (non-finite for {error.steps} steps in a row" in str(error)
    assert "stage2.optimizer.lr = 0.05" in str(error) and "loss weight" not in str(error)
