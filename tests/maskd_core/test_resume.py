"""A run interrupted by a cancel and resumed equals an uninterrupted one (CPU, to 1e-6)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from maskd_core_toys import Recorder, ToyNet, toy_context, toy_plan, toy_spec
from torch import nn

from maskd_core.errors import JobCancelled
from maskd_core.spec import JobSpec
from maskd_core.stages import TrainContext, run_stage1, run_stage2
from maskd_core.tokens import TokenSet

SPEC = toy_spec(
    stage1={"iterations": 6, "mask_weighting": True},
    stage2={
        "iterations": 6,
        "custom_mask": True,
        "custom_mask_warmup": 3,
        "optimizer": {"lr": 0.05, "schedule": "poly", "warmup_steps": 2},
    },
    checkpoint_every=100,
)


def fresh() -> tuple[nn.Module, nn.Module, TokenSet]:
    torch.manual_seed(1)
    teacher, student = ToyNet(4, dropout=0.0), ToyNet(2, dropout=0.3)  # dropout draws RNG
    return teacher, student, TokenSet([4], 3, weighting=True)


def stage1(ctx: TrainContext, ckpt: Path) -> nn.Module:
    teacher, student, tokens = fresh()
    run_stage1(ctx, teacher, tokens, toy_plan(teacher, student, ctx.spec), ckpt)
    return tokens


def stage2(ctx: TrainContext, ckpt: Path) -> nn.Module:
    teacher, student, tokens = fresh()
    run_stage2(ctx, teacher, student, tokens, toy_plan(teacher, student, ctx.spec), ckpt)
    return student


@pytest.mark.parametrize("stage", [stage1, stage2])
def test_resumed_run_equals_uninterrupted_run(
    tmp_path: Path, stage: Callable[[TrainContext, Path], nn.Module]
) -> None:
    spec: JobSpec = SPEC
    reference = stage(toy_context(spec), tmp_path / "straight.pt")

    stopper = Recorder(stop_at=4)
    with pytest.raises(JobCancelled) as err:
        stage(toy_context(spec, stopper), tmp_path / "resumed.pt")
    assert err.value.step == 4
    # Scramble the global RNGs: a resume must restore them from the checkpoint.
    torch.manual_seed(1234)
    resumer = Recorder()
    resumed = stage(toy_context(spec, resumer), tmp_path / "resumed.pt")
    assert [s for _, s, _ in resumer.steps] == [5, 6]

    for (name, value), other in zip(
        reference.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-6, msg=name)
