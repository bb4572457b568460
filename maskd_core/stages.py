"""The training loops: stage 1 (receptive tokens), stage 2 (masked distillation), supervised.

All three share one loop (``_train``) that owns what makes a job operable: global-step-indexed
batches, the per-step LR, mixed precision, gradient clipping, periodic and final checkpoints,
resume, cooperative cancellation and progress callbacks. A stage only supplies the function that
turns a batch into a loss and the modules that train; that is the whole difference between
them, and it reads as such below.

Stage 1 deviates from the official segmentation code on purpose: that code leaves the teacher in
``train()`` mode, so BatchNorm uses batch statistics (and updates its running stats) and dropout
is active while the tokens learn. We keep the teacher in ``train()`` (detectors only compute
losses in train mode) but put every normalisation and dropout layer in eval mode, as the official
detection hook does, so the teacher is deterministic and bit-identical after the stage.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from maskd_core.callbacks import STAGE1, STAGE2, Callback, Stage
from maskd_core.checkpoint import load_checkpoint, save_checkpoint
from maskd_core.detection_recipe import Inherited, detection_recipe
from maskd_core.distributed import (
    agree,
    any_rank,
    mean_over_ranks,
    ranks,
    sync_batchnorm,
    wrap_for_training,
)
from maskd_core.errors import JobCancelled, Setting, SpecError, TrainingDiverged
from maskd_core.losses import dice_diversity
from maskd_core.methods import Distiller, build_distiller, method_setup
from maskd_core.optim import build_optimizer, clip_gradients, lr_at, set_lr
from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec, OptimizerSpec
from maskd_core.taps import Taps
from maskd_core.tasks import Batch, Task
from maskd_core.tokens import TokenSet

StepFn = Callable[[Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``step_fn(batch, global_step) -> (loss, named scalar tensors)`` for one optimiser step.

Metrics stay tensors so the loop reads them all with one device synchronisation per step."""

FROZEN_IN_STAGE1 = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
"""Layers that behave differently in train mode; stage 1 keeps them in eval mode."""

FP16_NONFINITE_STEPS = 20
"""Non-finite losses in a row after which an fp16 run counts as diverged.

Without a scaler the first non-finite loss is fatal: its step would write NaN into every weight.
With fp16 the GradScaler skips such a step, so the weights stay as they were and one overflow on
an unlucky batch is survivable. A skipped step changes nothing, though, so the next batches meet
the very same weights: a few overflows in a row are still bad luck, twenty different batches in a
row are weights that overflow on any data, and going on would only burn the job's time."""


def resolve_device(spec: JobSpec) -> torch.device:
    """``auto`` is CUDA when present; mixed precision without CUDA is refused, not ignored.

    CPU processes (``resources.processes``) train on the CPU; a GPU process trains on the
    device its launcher set (``maskd_core.distributed``)."""
    if spec.resources.processes is not None:
        device = torch.device("cpu")
    elif spec.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(spec.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if spec.mixed_precision != "no" and device.type != "cuda":
        raise SpecError(
            f"mixed_precision {spec.mixed_precision!r} needs a CUDA device and this worker has "
            "none; use mixed_precision 'no'",
            field="mixed_precision",
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def freeze(module: nn.Module) -> None:
    module.requires_grad_(False)


@dataclass
class TrainContext:
    """What every loop of a job shares: spec, task, data, device and reporting.

    ``train_batches(start_step)`` yields the batches of global steps start_step, start_step+1,
    ... (the same ones whether or not the run was interrupted); ``val_batches()`` one pass over
    the validation data.
    """

    spec: JobSpec
    task: Task
    train_batches: Callable[[int], Iterator[Batch]]
    val_batches: Callable[[], Iterable[Batch]]
    device: torch.device
    callbacks: Callback = field(default_factory=Callback)

    def autocast(self) -> AbstractContextManager[object]:
        if self.spec.mixed_precision == "no":
            return nullcontext()
        dtype = torch.float16 if self.spec.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def evaluate(self, model: nn.Module, name: str) -> dict[str, float]:
        """The task's metrics for ``model`` on (at most max_eval_batches of) the validation data.

        Leaves ``model`` in eval mode. Metric names are prefixed by ``name`` (``student_miou``),
        so reports from different models of one job never collide. Only rank 0 of a
        multi-process job evaluates (its metrics are the job's); the others get no metrics.
        """
        model.eval()
        if not ranks().is_main:
            return {}
        batches: Iterable[Batch] = self.val_batches()
        if self.spec.max_eval_batches is not None:
            batches = itertools.islice(batches, self.spec.max_eval_batches)
        with torch.no_grad():
            metrics = self.task.evaluate(model, batches, self.device)
        return {f"{name}_{key}": value for key, value in metrics.items()}


@dataclass
class StageResult:
    """How a loop ended: the global step reached, speed and the last metrics."""

    step: int
    seconds_per_step: float | None
    metrics: dict[str, float]
    final_evaluation: dict[str, float] | None = None
    """The evaluation at the last step when the loop made one (``eval_every`` set and the last
    step run here), so the caller reports it as the final value instead of evaluating again."""
    inherited: Inherited | None = None
    """What a stage-2 student took from its teacher before training
    (``stage2.inherit_teacher_weights``); None when it took nothing."""


class NonFiniteStreak:
    """Counts the non-finite losses in a row; ``limit`` of them is divergence."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.length = 0

    def diverged(self, loss: float) -> bool:
        """Records one step's loss; True once ``limit`` non-finite ones came in a row."""
        self.length = 0 if math.isfinite(loss) else self.length + 1
        return self.length >= self.limit


def _train(
    ctx: TrainContext,
    *,
    stage: Stage,
    step_fn: StepFn,
    trainable: Mapping[str, nn.Module],
    optimizer_spec: OptimizerSpec,
    optimizer_field: str,
    loss_weight: Setting | None,
    iterations: int,
    checkpoint: Path | None,
    set_modes: Callable[[], object],
    evaluate: Callable[[], dict[str, float]],
) -> StageResult:
    """Optimise ``trainable`` with ``step_fn`` for ``iterations`` global steps, resumably.

    With ``eval_every`` the models are evaluated every that many steps and at the last step,
    each evaluation reported at its step, so the metric is a curve that ends on the stage's
    final value. ``set_modes`` puts the models in their training modes; it runs before the
    first step and after every evaluation rather than every step, since ``Module.train()``
    walks every submodule and costs a noticeable share of a small model's step.
    ``optimizer_field`` (the spec field ``optimizer_spec`` comes from) and ``loss_weight`` are
    what ``TrainingDiverged`` tells the user to lower.
    """
    params = [p for module in trainable.values() for p in module.parameters()]
    optimizer = build_optimizer(params, optimizer_spec)
    main, world_size = ranks().is_main, ranks().world_size
    scaler = torch.amp.GradScaler("cuda") if ctx.spec.mixed_precision == "fp16" else None
    nonfinite = NonFiniteStreak(1 if scaler is None else FP16_NONFINITE_STEPS)
    seed_everything(ctx.spec.seed)
    start = 0
    if checkpoint is not None and agree(checkpoint.is_file()):
        start = load_checkpoint(checkpoint, modules=trainable, optimizer=optimizer, scaler=scaler)

    def write_checkpoint(step: int) -> None:
        if checkpoint is not None and main:
            save_checkpoint(
                checkpoint, step=step, modules=trainable, optimizer=optimizer, scaler=scaler
            )
            ctx.callbacks.on_checkpoint(stage, step, checkpoint)

    ctx.callbacks.on_stage_start(stage, start, iterations, ctx.spec)
    metrics: dict[str, float] = {}
    final_evaluation: dict[str, float] | None = None
    started = time.perf_counter()
    batches = ctx.train_batches(start)
    # After the checkpoint is loaded: DDP starts every rank from rank 0's weights.
    train_step = _StepModule(step_fn, trainable)
    run_step = wrap_for_training(train_step, ctx.device)
    set_modes()
    try:
        for step in range(start, iterations):
            if any_rank(ctx.callbacks.should_stop()):
                write_checkpoint(step)
                raise JobCancelled(str(stage), step)
            tic = time.perf_counter()
            done = step + 1
            # A DataLoader draws its base seed from the global RNG when it starts, which a
            # resumed run does at a different step; fetching outside the training RNG stream
            # keeps dropout and friends identical to an uninterrupted run.
            with torch.random.fork_rng(devices=[]):
                batch = ctx.task.to_device(next(batches), ctx.device)
            lr = lr_at(optimizer_spec, step, iterations)
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            with ctx.autocast():
                loss, parts = run_step(batch, step)
            stacked = torch.stack([t.detach().float() for t in (loss, *parts.values())])
            values = mean_over_ranks(stacked).tolist()
            scalars = dict(zip(["loss", *parts], values, strict=True))
            if nonfinite.diverged(scalars["loss"]):
                raise TrainingDiverged(
                    str(stage),
                    done,
                    scalars["loss"],
                    [name for name in parts if not math.isfinite(scalars[name])],
                    lr=Setting(f"{optimizer_field}.lr", optimizer_spec.lr),
                    loss_weight=loss_weight,
                    grad_clip=Setting(f"{optimizer_field}.grad_clip", optimizer_spec.grad_clip),
                    steps=nonfinite.length,
                )
            _optimise(loss, optimizer, scaler, optimizer_spec.grad_clip)
            seconds = time.perf_counter() - tic
            metrics = {
                **scalars,
                "lr": lr,
                "images_per_sec": ctx.task.batch_size(batch) * world_size / max(seconds, 1e-9),
            }
            ctx.callbacks.on_step(stage, done, metrics)
            if done % ctx.spec.checkpoint_every == 0 or done == iterations:
                write_checkpoint(done)
            if ctx.spec.eval_every and (done % ctx.spec.eval_every == 0 or done == iterations):
                evaluation = evaluate()
                ctx.callbacks.on_eval(stage, done, evaluation)
                if done == iterations:
                    final_evaluation = evaluation
                set_modes()
    finally:
        if isinstance(batches, Generator):  # shuts down loader workers
            batches.close()
    steps_run = iterations - start
    seconds_per_step = (time.perf_counter() - started) / steps_run if steps_run else None
    ctx.callbacks.on_stage_end(stage, iterations, metrics)
    return StageResult(iterations, seconds_per_step, metrics, final_evaluation)


class _StepModule(nn.Module):
    """One training step as a module over the trainable ones, the shape
    ``DistributedDataParallel`` wraps: its forward computes the step's loss, and DDP averages
    the trainable modules' gradients over the ranks in backward. The frozen models the step
    runs (the teacher) are not its submodules, so DDP neither syncs nor checks them."""

    def __init__(self, step_fn: StepFn, trainable: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.step_fn = step_fn
        self.trainable = nn.ModuleDict(trainable)

    def forward(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.step_fn(batch, step)


def _optimise(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip: float | None,
) -> None:
    """Backward, clip and step; with fp16 the scaler skips steps whose gradients overflowed."""
    if scaler is None:
        torch.autograd.backward(loss)
        clip_gradients(optimizer, grad_clip)
        optimizer.step()
    else:
        torch.autograd.backward(scaler.scale(loss))
        scaler.unscale_(optimizer)
        clip_gradients(optimizer, grad_clip)
        scaler.step(optimizer)
        scaler.update()


def train_with_frozen_norms(model: nn.Module) -> None:
    """``train()`` mode with normalisation and dropout layers in eval mode (see module doc)."""
    model.train()
    for module in model.modules():
        if isinstance(module, FROZEN_IN_STAGE1):
            module.eval()


def run_stage1(
    ctx: TrainContext,
    teacher: nn.Module,
    tokens: TokenSet,
    plan: JobPlan,
    checkpoint: Path | None,
) -> StageResult:
    """Learn ``tokens`` on the frozen ``teacher``: task loss on masked features + Dice.

    Every tapped teacher level is replaced by its masked version, so the teacher's own head and
    loss see only what the masks let through; only the tokens (and weighting branches) train.
    The stage's evaluation measures the masked teacher, a check that the masks keep what the
    task needs.
    """
    spec = ctx.spec.stage1
    freeze(teacher)
    teacher.to(ctx.device)
    tokens.to(ctx.device)
    step_masks: list[torch.Tensor] = []

    def step_fn(batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step_masks.clear()
        task_loss, _ = ctx.task.training_loss(teacher, batch)
        dice = torch.stack([dice_diversity(m) for m in step_masks]).sum()
        loss = task_loss + spec.dice_weight * dice
        return loss, {"task_loss": task_loss.detach(), "dice": dice.detach()}

    with masking(teacher, ctx.spec.teacher.tapped_layers, tokens, plan, record=step_masks):
        return _train(
            ctx,
            stage=STAGE1,
            step_fn=step_fn,
            trainable={"tokens": tokens},
            optimizer_spec=spec.optimizer,
            optimizer_field="stage1.optimizer",
            loss_weight=None,
            iterations=spec.iterations,
            checkpoint=checkpoint,
            set_modes=lambda: train_with_frozen_norms(teacher),
            evaluate=lambda: ctx.evaluate(teacher, "masked_teacher"),
        )


def masking(
    teacher: nn.Module,
    layers: list[str],
    tokens: TokenSet,
    plan: JobPlan,
    record: list[torch.Tensor] | None = None,
) -> Taps:
    """Taps that replace every distilled teacher level by its masked version.

    In train mode the masks of each level are appended to ``record`` (for the Dice term);
    evaluation passes record nothing.
    """
    index = {(lv.pair, lv.level): k for k, lv in enumerate(plan.levels)}

    def mask_level(layer: int, level: int, feature: torch.Tensor) -> torch.Tensor:
        masked, masks = tokens.level(index[layer, level]).mask_feature(feature)
        if record is not None and teacher.training:
            record.append(masks)
        return masked

    return Taps(teacher, layers, replace=mask_level, field="teacher.layers")


def evaluate_masked_teacher(
    ctx: TrainContext, teacher: nn.Module, tokens: TokenSet, plan: JobPlan
) -> dict[str, float]:
    """The teacher's metrics when its head sees only masked features (the stage-1 check)."""
    tokens.to(ctx.device)
    with masking(teacher, ctx.spec.teacher.tapped_layers, tokens, plan), torch.no_grad():
        return ctx.evaluate(teacher, "masked_teacher")


def build_aligns(plan: JobPlan, kind: str) -> nn.ModuleList:
    """Per level, the student→teacher adaptation: 1x1 conv with bias, or identity."""
    return nn.ModuleList(
        nn.Identity()
        if kind == "identity"
        else nn.Conv2d(lv.student_channels, lv.teacher_channels, kernel_size=1)
        for lv in plan.levels
    )


def run_stage2(
    ctx: TrainContext,
    teacher: nn.Module,
    student: nn.Module,
    tokens: TokenSet | None,
    plan: JobPlan,
    checkpoint: Path | None,
    stage: Stage = STAGE2,
) -> StageResult:
    """Distil ``teacher`` into ``student`` with the job's method (``stage2.method``).

    Trains the student, the per-level aligns and the method's own modules on task loss +
    weight · the method's loss over levels; the teacher runs in eval mode under no_grad, and the
    ``tokens`` (MasKD's; None for methods without stage 1) are frozen. ``stage`` is the name
    callbacks see (one per run in a comparison job). A detection student may first inherit the
    teacher's neck and head, and add head-level regression KD (``maskd_core.detection_recipe``).
    """
    spec = ctx.spec.stage2
    freeze(teacher)
    if tokens is not None:
        freeze(tokens)
    torch.manual_seed(ctx.spec.seed)
    aligns = build_aligns(plan, spec.align)
    distiller = build_distiller(method_setup(ctx.spec, plan, spec.method, tokens))
    inherited, head = detection_recipe(ctx.spec, teacher, student)
    student = sync_batchnorm(student, ctx.device)
    uses_teacher = distiller.uses_teacher or head is not None
    for module in (teacher, student, aligns, distiller):
        module.to(ctx.device)

    teacher_taps = Taps(teacher, ctx.spec.teacher.tapped_layers, field="teacher.layers")
    student_taps = Taps(student, ctx.spec.distilled_student.tapped_layers, field="student.layers")
    # The auxiliary heads a method distils besides the levels, tapped on both models alike.
    aux_taps = [
        Taps(model, [distiller.aux_layer], field=f"{role}.layers")
        for model, role in ((teacher, "teacher"), (student, "student"))
        if distiller.aux_layer is not None and distiller.uses_teacher
    ]

    def set_modes() -> None:
        teacher.eval()
        student.train()

    def step_fn(batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not uses_teacher:
            task_loss, _ = ctx.task.training_loss(student, batch)
            return task_loss, {"task_loss": task_loss.detach(), "kd_loss": task_loss.new_zeros(())}
        with torch.no_grad():
            if head is None:
                ctx.task.forward(teacher, batch)
            else:  # through the teacher's head too, which head KD reads
                head.teacher_forward(teacher, batch)
        task_loss, _ = ctx.task.training_loss(student, batch)
        parts = {"task_loss": task_loss.detach()}
        head_term = task_loss.new_zeros(())
        if head is not None:
            head_kd = head.loss()
            head_term = head.weight * head_kd
            parts["head_kd_loss"] = head_kd.detach()
        if not distiller.uses_teacher:
            return task_loss + head_term, {**parts, "kd_loss": task_loss.new_zeros(())}
        aligned = [align(s) for align, s in zip(aligns, student_taps.levels(), strict=True)]
        kd = distiller.loss(aligned, teacher_taps.levels(), step)
        if aux_taps:
            teacher_aux, student_aux = (tap.layer_levels(0)[0] for tap in aux_taps)
            kd_aux = distiller.aux_loss(student_aux, teacher_aux, step)
            kd = kd + kd_aux
            parts["kd_aux_loss"] = kd_aux.detach()
        for tap in (teacher_taps, student_taps, *aux_taps):
            tap.clear()
        loss = task_loss + distiller.weight * kd + head_term
        return loss, {**parts, "kd_loss": kd.detach()}

    # Methods without trainable modules of their own (MasKD: frozen tokens) add nothing to the
    # optimiser or the checkpoint, so checkpoints written before methods existed still resume.
    trainable: dict[str, nn.Module] = {"student": student, "aligns": aligns}
    if any(p.requires_grad for p in distiller.parameters()):
        trainable["method"] = distiller
    with ExitStack() as taps:
        if distiller.uses_teacher:
            for tap in (teacher_taps, student_taps, *aux_taps):
                taps.enter_context(tap)
        for tap in head.taps if head is not None else ():
            taps.enter_context(tap)
        result = _train(
            ctx,
            stage=stage,
            step_fn=step_fn,
            trainable=trainable,
            optimizer_spec=spec.optimizer,
            optimizer_field="stage2.optimizer",
            loss_weight=_method_weight(distiller, stage),
            iterations=spec.iterations,
            checkpoint=checkpoint,
            set_modes=set_modes,
            evaluate=lambda: ctx.evaluate(student, "student"),
        )
    return replace(result, inherited=inherited)


def _method_weight(distiller: Distiller, stage: Stage) -> Setting | None:
    """The method's loss weight as the spec field that set it; None if it weighs nothing.

    A comparison run's method is the entry of ``comparison.methods`` with the run's name.
    """
    if distiller.weight_field is None or not distiller.weight:
        return None
    method = "stage2.method"
    if stage.is_comparison_run:
        method = f"comparison.methods[name={stage.method}]"
    return Setting(f"{method}.params.{distiller.weight_field}", distiller.weight)


def train_supervised(
    ctx: TrainContext,
    model: nn.Module,
    optimizer_spec: OptimizerSpec,
    iterations: int,
    checkpoint: Path | None,
    stage: Stage,
    optimizer_field: str = "stage2.optimizer",
) -> StageResult:
    """Plain task-loss training: teachers and the no-KD student baseline.

    ``optimizer_field`` is where ``optimizer_spec`` sits in the spec, the field a diverged run
    names: ``stage2.optimizer`` for the baseline, ``teacher_training.optimizer`` for a teacher
    trained with a recipe of its own.
    """
    model.to(ctx.device)
    model = sync_batchnorm(model, ctx.device)

    def step_fn(batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        task_loss, _ = ctx.task.training_loss(model, batch)
        return task_loss, {"task_loss": task_loss.detach()}

    return _train(
        ctx,
        stage=stage,
        step_fn=step_fn,
        trainable={"model": model},
        optimizer_spec=optimizer_spec,
        optimizer_field=optimizer_field,
        loss_weight=None,
        iterations=iterations,
        checkpoint=checkpoint,
        set_modes=lambda: model.train(),
        evaluate=lambda: ctx.evaluate(model, stage.kind),
    )
