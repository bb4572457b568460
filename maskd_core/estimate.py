"""What a job will cost before it is queued: parameters, FLOPs, peak memory and time per stage.

``estimate_job`` validates the spec exactly as a submission does, builds the dataset and both
models, and runs a few *real* steps of each stage through the stages' own loop
(``maskd_core.stages``: the same step functions, loader, optimiser and taps a job runs), so the
seconds per step are measured rather than modelled. What is measured, and where, is part of the
answer (``MeasuredOn``): an estimate made on the API host's CPU for a job that will run on a
GPU worker says so, as its seconds say little about a GPU's.

How each figure is obtained:

- **Parameters**: the sum of ``numel`` over the model's parameters.
- **Forward FLOPs per image**: ``torch.utils.flop_counter.FlopCounterMode`` over one eval-mode
  forward of one sample (matrix multiplies and convolutions; elementwise work is not counted).
- **FLOPs per step**: the same counter over the first measured step of the stage, forward *and*
  backward as autograd ran them, so nothing is assumed about the backward's cost (the usual
  rule of thumb, backward ≈ 2× forward, overstates stage 1, whose frozen teacher computes no
  weight gradients).
- **Seconds per step**: the median wall time between the ends of consecutive steps after the
  first (the first pays for lazy initialisation and the FLOP counter). Data loading is included,
  with ``num_workers`` 0.
- **Peak memory per device**: on CUDA, ``torch.cuda.max_memory_allocated`` over the stage's
  measured steps. On a CPU there is no allocator to ask, so it is the sum of what a step must
  hold at once: the weights and buffers of every model on the device, the gradients and
  optimiser state of what trains (momentum SGD one copy, Adam two), the batch, and every
  distinct tensor autograd saved for the backward during the first step (counted through
  ``torch.autograd.graph.saved_tensors_hooks``). Allocator slack and the transient workspace of
  single kernels are not in it.
- **ETA**: per stage, iterations × seconds per step plus the evaluations the stage runs (passes
  × validation batches × the measured seconds of one validation batch); the total adds them.

With ``resources`` the step runs on ``batch_size / world_size`` samples per process, which is
what is measured; the all-reduce between processes is not, so a multi-process ETA is a lower
bound.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from maskd_core.callbacks import STAGE1, STAGE2, TEACHER, Callback, Stage
from maskd_core.data import build_dataset
from maskd_core.loader import train_batches, train_val_split, val_batches
from maskd_core.methods import build_distiller, job_needs_tokens, method_setup
from maskd_core.models import build_model, with_default_layers
from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec, MethodSpec, OptimizerSpec, ResourcesSpec
from maskd_core.stages import (
    TrainContext,
    build_aligns,
    run_stage1,
    run_stage2,
    train_supervised,
)
from maskd_core.tasks import Batch, Task, build_task
from maskd_core.tokens import TokenSet
from maskd_core.validate import validate_job

FORMAT = "maskd-estimate/1"
DEFAULT_MEASURED_STEPS = 3
MAX_MEASURED_STEPS = 5
"""Timed steps per stage at most (each stage also runs one untimed, FLOP-counted step first):
an estimate must stay a small fraction of a submission's cost to whoever serves it."""

MemoryMethod = Literal["cuda_max_memory_allocated", "cpu_sum_of_held_tensors"]


@dataclass(frozen=True)
class ModelCost:
    """One network's size and the cost of one forward of one image through it."""

    arch: str
    parameters: int
    forward_flops_per_image: int


@dataclass(frozen=True)
class MeasuredOn:
    """Where the steps were timed, and whether that is the kind of device the job will get."""

    device: str
    """``cpu`` or ``cuda``."""
    device_name: str
    """The GPU's name, or the CPU's with the threads torch used."""
    target_device: str
    """What the spec asks for: ``cpu``, ``cuda`` or ``auto`` (a GPU worker's CUDA, if any)."""
    representative: bool
    """False when the seconds come from another kind of device than the job will run on."""
    note: str


@dataclass(frozen=True)
class StageEstimate:
    """One training loop of the job: ``stage`` as progress and events spell it."""

    stage: str
    iterations: int
    batch_per_process: int
    seconds_per_step: float
    flops_per_step: int
    peak_memory_bytes: int
    evaluation_passes: int
    evaluation_seconds: float
    seconds: float
    """iterations × seconds_per_step + evaluation_seconds."""


@dataclass(frozen=True)
class JobEstimate:
    """The whole estimate; ``to_dict`` is what the API answers and a job's outputs record."""

    measured_on: MeasuredOn
    measured_steps: int
    world_size: int
    memory_method: MemoryMethod
    teacher: ModelCost
    student: ModelCost | None
    stages: list[StageEstimate]
    total_seconds: float
    pairing: dict[str, Any] | None
    """The levels the job distils (``JobPlan.pairing``), as a submission reports them; None
    for a teacher job."""
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eta_seconds(iterations: int, seconds_per_step: float, evaluation_seconds: float) -> float:
    """A loop's time: its steps at the measured rate, plus its evaluations."""
    return iterations * seconds_per_step + evaluation_seconds


def evaluation_passes(iterations: int, eval_every: int) -> int:
    """Validation passes a loop of ``iterations`` steps makes: one every ``eval_every`` steps
    and one at the last step (``stages._train``), or one at the end when ``eval_every`` is 0
    (the runner's final evaluation)."""
    if eval_every == 0:
        return 1
    return iterations // eval_every + (1 if iterations % eval_every else 0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(task: Task, model: nn.Module, batch: Batch) -> int:
    """FLOPs of one eval-mode forward of ``batch`` (``FlopCounterMode``'s count)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        task.forward(model, batch)
    return int(counter.get_total_flops())


OPTIMIZER_STATE_COPIES = {"adam": 2, "adamw": 2}
"""Tensors of optimiser state per trained parameter (``maskd_core.optim``): Adam and AdamW keep
two moments; SGD keeps one momentum buffer, none without momentum."""


def optimizer_state_copies(spec: OptimizerSpec) -> int:
    if spec.name == "sgd":
        return 1 if spec.momentum else 0
    return OPTIMIZER_STATE_COPIES[spec.name]


def _module_bytes(modules: list[nn.Module], *, trained_only: bool = False) -> int:
    """Bytes of the modules' parameters and buffers (or of their trained parameters), each
    storage counted once however many modules share it (a method holding the tokens)."""
    storages: dict[int, int] = {}
    for module in modules:
        tensors: list[torch.Tensor] = [
            p for p in module.parameters() if p.requires_grad or not trained_only
        ]
        if not trained_only:
            tensors.extend(module.buffers())
        for tensor in tensors:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


class _StepMeter(Callback):
    """Times a stage's steps and counts its first step's FLOPs and saved activations.

    The counters are entered when the stage starts and left after its first step, so that step
    (which also pays for lazy initialisation) is counted and never timed.
    """

    def __init__(self, device: torch.device, held: list[nn.Module]) -> None:
        self.device = device
        self._held_storages = {
            t.untyped_storage().data_ptr()
            for module in held
            for t in (*module.parameters(), *module.buffers())
        }
        self._counting = ExitStack()
        self._flops = FlopCounterMode(display=False)
        self._saved: dict[int, int] = {}
        self.flops_per_step = 0
        self.step_ends: list[float] = []

    @property
    def saved_bytes(self) -> int:
        """Distinct tensors autograd kept for the first step's backward, weights excluded."""
        return sum(self._saved.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, nn.Parameter):  # a weight, held anyway
            return tensor
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._held_storages:
            self._saved[pointer] = storage.nbytes()
        return tensor

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._counting.enter_context(self._flops)
        self._counting.enter_context(
            torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        )

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        # The loop reads the step's losses back first, so the step has finished on the device.
        if step == 1:
            self.close()
            self.flops_per_step = int(self._flops.get_total_flops())
        self.step_ends.append(time.perf_counter())

    def close(self) -> None:
        self._counting.close()

    def seconds_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.step_ends, self.step_ends[1:], strict=False)]
        return statistics.median(gaps)

    def cuda_peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


@dataclass
class _Setting:
    """What every measured loop shares: the job's spec, where and on how much data it runs."""

    spec: JobSpec
    measuring: JobSpec
    """``spec`` as the measured loops run it: per-process batch, no intermediate evaluation,
    loader in process, the measuring device (no mixed precision on a CPU)."""
    task: Task
    train: Any
    val: Any
    device: torch.device
    steps: int
    plan: JobPlan
    eval_seconds_per_batch: dict[str, float] = field(default_factory=dict)

    def context(self, meter: _StepMeter) -> TrainContext:
        batch = self.measuring.batch_size
        return TrainContext(
            spec=self.measuring,
            task=self.task,
            train_batches=lambda start: train_batches(
                self.train,
                self.task,
                batch,
                self.spec.seed,
                start_step=start,
                augment=self.spec.dataset.augment,
            ),
            val_batches=lambda: val_batches(self.val, self.task, self.spec.batch_size),
            device=self.device,
            callbacks=meter,
        )

    @property
    def val_batches_per_pass(self) -> int:
        batches = math.ceil(len(self.val) / self.spec.batch_size)
        if self.spec.max_eval_batches is not None:
            batches = min(batches, self.spec.max_eval_batches)
        return batches

    def eval_seconds(self, model: nn.Module, name: str) -> float:
        """Seconds of one validation batch through ``model`` (the second of two, the first
        being a warm-up), remembered per ``name``."""
        if name not in self.eval_seconds_per_batch:
            batch = next(iter(val_batches(self.val, self.task, self.spec.batch_size)))
            model.to(self.device)
            model.eval()
            seconds = 0.0
            for _ in range(2):
                tic = time.perf_counter()
                with torch.no_grad():
                    self.task.evaluate(model, [batch], self.device)
                seconds = time.perf_counter() - tic
            self.eval_seconds_per_batch[name] = seconds
        return self.eval_seconds_per_batch[name]

    def measure(
        self,
        stage: Stage,
        iterations: int,
        run: Callable[[TrainContext, int], object],
        held: list[nn.Module],
        trained: list[nn.Module],
        optimizer: OptimizerSpec,
        evaluations: tuple[int, float],
    ) -> StageEstimate:
        """Run ``run(ctx, steps)`` for 1 + ``self.steps`` steps and describe the loop.

        ``held`` are the modules on the device during the loop, ``trained`` those the
        optimiser updates; ``evaluations`` is (passes, seconds per validation batch).
        """
        meter = _StepMeter(self.device, held)
        try:
            run(self.context(meter), 1 + self.steps)
        finally:
            meter.close()
        seconds = meter.seconds_per_step()
        if self.device.type == "cuda":
            peak = meter.cuda_peak()
        else:
            trained_bytes = _module_bytes(trained, trained_only=True)
            batch = self.task.collate([self.train[0]] * self.measuring.batch_size)
            peak = (
                _module_bytes(held)
                + trained_bytes * (1 + optimizer_state_copies(optimizer))
                + meter.saved_bytes
                + _batch_bytes(batch)
            )
        passes, per_batch = evaluations
        eval_seconds = passes * self.val_batches_per_pass * per_batch
        return StageEstimate(
            stage=str(stage),
            iterations=iterations,
            batch_per_process=self.measuring.batch_size,
            seconds_per_step=seconds,
            flops_per_step=meter.flops_per_step,
            peak_memory_bytes=peak,
            evaluation_passes=passes,
            evaluation_seconds=eval_seconds,
            seconds=eta_seconds(iterations, seconds, eval_seconds),
        )


def _batch_bytes(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(_batch_bytes(value) for value in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_batch_bytes(item) for item in batch)
    return 0


def measuring_device(spec: JobSpec) -> torch.device:
    """CUDA when this host has it and the spec may use it; else the CPU."""
    if spec.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _measured_on(spec: JobSpec, device: torch.device) -> MeasuredOn:
    target = "cuda" if spec.resources.gpus is not None else spec.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = (
            f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        )
    representative = target == device.type
    if representative:
        note = f"measured on this host's {device.type}, the kind of device the job asks for"
    elif target == "auto":
        note = (
            f"measured on {device.type} ({name}); device 'auto' runs on the worker's GPU if it "
            "has one, where the seconds can be far lower"
        )
    else:
        note = (
            f"measured on {device.type} ({name}), not on the {target} the job will run on: "
            "FLOPs, parameters and the step count hold, the seconds and memory do not"
        )
    return MeasuredOn(device.type, name, target, representative, note)


def estimate_job(spec: JobSpec, steps: int = DEFAULT_MEASURED_STEPS) -> JobEstimate:
    """Validate ``spec`` and measure its cost on this host (see the module docstring).

    Raises ``SpecError`` as ``validate_job`` does; ``steps`` (timed steps per stage) is capped
    at ``MAX_MEASURED_STEPS``. A comparison measures each method once and counts it once per
    seed; its stages are named per run (``stage2/mgd/seed1``), as the job will report them.
    """
    if not 1 <= steps <= MAX_MEASURED_STEPS:
        raise ValueError(f"steps must be 1 to {MAX_MEASURED_STEPS}, not {steps}")
    task = build_task(spec)
    dataset = build_dataset(spec)
    torch.manual_seed(spec.seed)  # the teacher the job will build
    teacher = build_model(spec.teacher, dataset.num_classes, field="teacher")
    plan = validate_job(spec, dataset=dataset, teacher=teacher)
    spec = with_default_layers(spec)  # the layers the plan pairs, which the stages tap
    train, val = train_val_split(spec, dataset)
    device = measuring_device(spec)
    per_process = spec.batch_size // spec.resources.world_size
    measuring = spec.model_copy(
        update={
            "batch_size": per_process,
            "resources": ResourcesSpec(),  # one process's share, measured as one process
            "num_workers": 0,
            "eval_every": 0,
            "device": device.type,
            "mixed_precision": spec.mixed_precision if device.type == "cuda" else "no",
        }
    )
    setting = _Setting(spec, measuring, task, train, val, device, steps, plan)
    one = task.to_device(task.collate([train[0]]), device)
    teacher.to(device)
    teacher_cost = ModelCost(
        spec.teacher.arch, count_parameters(teacher), forward_flops(task, teacher, one)
    )
    if spec.kind == "teacher":
        stages = [_teacher_stage(setting, teacher)]
        student_cost = None
    else:
        stages, student_cost = _distillation_stages(setting, teacher, one)
    return JobEstimate(
        measured_on=_measured_on(spec, device),
        measured_steps=steps,
        world_size=spec.resources.world_size,
        memory_method=(
            "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_sum_of_held_tensors"
        ),
        teacher=teacher_cost,
        student=student_cost,
        stages=stages,
        total_seconds=sum(stage.seconds for stage in stages),
        pairing=plan.pairing() if plan.levels else None,
    )


def _teacher_stage(setting: _Setting, teacher: nn.Module) -> StageEstimate:
    """A teacher job's one loop, trained with ``teacher_training``."""
    recipe = setting.spec.teacher_training
    assert recipe is not None  # JobSpec._fields_of_kind: a teacher job has its recipe
    passes = evaluation_passes(recipe.iterations, setting.spec.eval_every)
    return setting.measure(
        TEACHER,
        recipe.iterations,
        lambda ctx, steps: train_supervised(ctx, teacher, recipe.optimizer, steps, None, TEACHER),
        held=[teacher],
        trained=[teacher],
        optimizer=recipe.optimizer,
        evaluations=(passes, setting.eval_seconds(teacher, "teacher")),
    )


def _distillation_stages(
    setting: _Setting, teacher: nn.Module, one: Batch
) -> tuple[list[StageEstimate], ModelCost]:
    spec, plan = setting.spec, setting.plan
    teacher_eval = setting.eval_seconds(teacher, "teacher")
    stages: list[StageEstimate] = []
    tokens: TokenSet | None = None
    if job_needs_tokens(spec):
        torch.manual_seed(spec.seed)
        tokens = TokenSet(
            [lv.teacher_channels for lv in plan.levels],
            spec.stage1.tokens,
            spec.stage1.mask_weighting,
        ).to(setting.device)
        stage1_tokens = tokens
        # The teacher's evaluation before the stage, the masked teacher's after it, and any
        # in between.
        passes = 2 + (
            evaluation_passes(spec.stage1.iterations, spec.eval_every) if spec.eval_every else 0
        )
        stages.append(
            setting.measure(
                STAGE1,
                spec.stage1.iterations,
                lambda ctx, steps: run_stage1(
                    _with_iterations(ctx, stage1=steps), teacher, stage1_tokens, plan, None
                ),
                held=[teacher, stage1_tokens],
                trained=[stage1_tokens],
                optimizer=spec.stage1.optimizer,
                evaluations=(passes, teacher_eval),
            )
        )
    torch.manual_seed(spec.seed)
    student = build_model(spec.distilled_student, plan.num_classes, field="student")
    student_cost = ModelCost(
        spec.distilled_student.arch,
        count_parameters(student),
        forward_flops(setting.task, student.to(setting.device), one),
    )
    runs = [(STAGE2, spec.stage2.method)]
    if spec.comparison is not None:
        runs = [
            (Stage.comparison_run(method.name, seed), method)
            for method in spec.comparison.methods
            for seed in spec.comparison.seeds
        ]
    measured: dict[str, StageEstimate] = {}
    student_eval = setting.eval_seconds(student, "student")
    for stage, method in runs:
        estimate = measured.get(method.name)
        if estimate is None:
            estimate = _measure_stage2(setting, stage, method, teacher, tokens, student_eval)
            measured[method.name] = estimate
        if not stages:  # no stage 1: the teacher's evaluation comes before the first run
            eval_seconds = estimate.evaluation_seconds + setting.val_batches_per_pass * teacher_eval
            estimate = replace(
                estimate,
                evaluation_passes=estimate.evaluation_passes + 1,
                evaluation_seconds=eval_seconds,
                seconds=eta_seconds(estimate.iterations, estimate.seconds_per_step, eval_seconds),
            )
        stages.append(replace(estimate, stage=str(stage)))
    return stages, student_cost


def _measure_stage2(
    setting: _Setting,
    stage: Stage,
    method: MethodSpec,
    teacher: nn.Module,
    tokens: TokenSet | None,
    student_eval: float,
) -> StageEstimate:
    """Stage 2 with ``method`` on a fresh student, its aligns and the method's modules."""
    spec, plan = setting.spec, setting.plan
    run_spec = setting.measuring.run_spec(method, spec.seed)
    torch.manual_seed(spec.seed)
    student = build_model(spec.distilled_student, plan.num_classes, field="student")
    # Replicas of the modules run_stage2 builds for itself, to count what they hold.
    aligns = build_aligns(plan, spec.stage2.align)
    distiller = build_distiller(method_setup(run_spec, plan, method, tokens))
    trained: list[nn.Module] = [student, aligns, distiller]
    held: list[nn.Module] = [teacher, *trained, *([tokens] if tokens is not None else [])]
    passes = evaluation_passes(spec.stage2.iterations, spec.eval_every)

    def run(ctx: TrainContext, steps: int) -> object:
        ctx.spec = _with_iterations(ctx, stage2=steps).spec.run_spec(method, spec.seed)
        return run_stage2(ctx, teacher, student, tokens, plan, None, stage)

    return setting.measure(
        stage,
        spec.stage2.iterations,
        run,
        held=held,
        trained=trained,
        optimizer=spec.stage2.optimizer,
        evaluations=(passes, student_eval),
    )


def _with_iterations(
    ctx: TrainContext, *, stage1: int | None = None, stage2: int | None = None
) -> TrainContext:
    """``ctx`` whose spec runs ``stage1``/``stage2`` iterations (the measured steps)."""
    update: dict[str, Any] = {}
    if stage1 is not None:
        update["stage1"] = ctx.spec.stage1.model_copy(update={"iterations": stage1})
    if stage2 is not None:
        update["stage2"] = ctx.spec.stage2.model_copy(update={"iterations": stage2})
    ctx.spec = ctx.spec.model_copy(update=update)
    return ctx
