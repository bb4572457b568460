"""A whole MasKD job: teacher → stage 1 → stage 2 → evaluation → files in the work directory.

``run_job`` is what the worker and ``maskd run`` call. It is resumable per stage: stage 1 is
finished once ``tokens.pt`` exists (the worker may also place reused tokens there), and each
stage's loop continues from its own checkpoint, so calling ``run_job`` again in the same work
directory after a crash or a cancel picks up where it stopped.

Files written under ``workdir`` (each atomically): ``stage1/checkpoint.pt``,
``stage2/checkpoint.pt``, ``baseline/checkpoint.pt`` (with ``baseline=True``), ``tokens.pt``,
``student.pt`` (a state dict) and ``summary.json``.

Stage 1 runs only for methods that need tokens (``stage2.method`` MasKD); for the others no
``stage1/`` or ``tokens.pt`` is written, and ``JobResult.tokens_path`` is None.

``run_comparison`` runs a job with ``comparison``: the dataset, its split, the teacher, its
evaluation and stage 1 (once, if any method needs tokens) are shared, and each (method, seed)
trains a student in ``runs/<method>-seed<seed>/`` laid out like a single job's work directory.
A run with a ``summary.json`` is finished and skipped on a rerun; the one that was interrupted
resumes from its checkpoint. The table goes to ``comparison.json`` and ``comparison.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

import maskd_core
from maskd_core.callbacks import Callback, CallbackList, Stage, comparison_stage
from maskd_core.checkpoint import atomic_save
from maskd_core.data.loader import DatasetSubset, split_dataset, train_batches, val_batches
from maskd_core.methods import METHODS, job_needs_tokens
from maskd_core.models import build_model
from maskd_core.spec import JobSpec, MethodSpec
from maskd_core.stages import (
    StageResult,
    TrainContext,
    evaluate_masked_teacher,
    resolve_device,
    run_stage1,
    run_stage2,
    train_supervised,
)
from maskd_core.taps import Taps
from maskd_core.tasks import Task
from maskd_core.tokens import TokenSet, load_tokens, save_tokens
from maskd_core.validate import JobPlan, build_dataset, build_task, validate_job

Callbacks = Callback | Sequence[Callback] | None


@dataclass
class JobResult:
    """Where a finished job's files are and what it measured (``summary`` is summary.json)."""

    workdir: Path
    plan: JobPlan
    tokens_path: Path | None
    """None for methods that learn no tokens."""
    student_path: Path
    summary_path: Path
    summary: dict[str, Any]

    @property
    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = self.summary["metrics"]
        return metrics


def _callback(callbacks: Callbacks) -> Callback:
    if callbacks is None:
        return Callback()
    if isinstance(callbacks, Callback):
        return callbacks
    return CallbackList(callbacks)


Splits = tuple[DatasetSubset, DatasetSubset]


def _context(spec: JobSpec, task: Task, splits: Splits, callbacks: Callback) -> TrainContext:
    """Training batches drawn by ``spec.seed`` from the given (train, val) split.

    The split is passed in rather than drawn here so that comparison runs with different
    seeds still train and evaluate on the same samples.
    """
    train_data, val_data = splits
    return TrainContext(
        spec=spec,
        task=task,
        train_batches=lambda start: train_batches(
            train_data,
            task,
            spec.batch_size,
            spec.seed,
            start_step=start,
            num_workers=spec.num_workers,
            augment=spec.dataset.augment,
        ),
        val_batches=lambda: val_batches(val_data, task, spec.batch_size, spec.num_workers),
        device=resolve_device(spec),
        callbacks=callbacks,
    )


def _evaluate(
    ctx: TrainContext, model: nn.Module, name: str, step: int, stage: Stage = "eval"
) -> dict[str, float]:
    """Evaluate and report ``model``; metric names are prefixed by what was evaluated."""
    metrics = ctx.evaluate(model, name)
    ctx.callbacks.on_eval(stage, step, metrics)
    return metrics


def teacher_identity(spec: JobSpec) -> dict[str, Any]:
    """What the tokens artifact records about the teacher, to refuse reuse on another one."""
    digest = None
    if spec.teacher.weights is not None:
        digest = hashlib.sha256(Path(spec.teacher.weights).read_bytes()).hexdigest()
    return {"arch": spec.teacher.arch, "args": dict(spec.teacher.args), "weights_sha256": digest}


def _mask_overlays(
    ctx: TrainContext, teacher: nn.Module, tokens: TokenSet, plan: JobPlan
) -> dict[str, np.ndarray]:
    """Every token's mask on the first validation image, blended over it in red."""
    batch = ctx.task.to_device(next(iter(ctx.val_batches())), ctx.device)
    image = ctx.task.example_input(batch)[0]
    image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-6)
    overlays = {}
    teacher.eval()
    with Taps(teacher, ctx.spec.teacher.layers) as taps, torch.no_grad():
        ctx.task.forward(teacher, batch)
        for k, feature in enumerate(taps.levels()):
            masks = tokens.level(k).masks(feature[:1])
            masks = torch.nn.functional.interpolate(masks, size=image.shape[-2:], mode="bilinear")
            for t, mask in enumerate(masks[0]):
                red = torch.stack([torch.ones_like(mask), torch.zeros_like(mask), mask * 0])
                blend = image * (1 - 0.6 * mask) + 0.6 * mask * red
                pixels = (blend.clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
                overlays[f"level{k}/token{t}"] = pixels
    return overlays


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _write_text(path: Path, text: str) -> None:
    """Written to a temporary name and renamed, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    return {
        "maskd": maskd_core.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _stage1(
    ctx: TrainContext, teacher: nn.Module, plan: JobPlan, workdir: Path
) -> tuple[TokenSet, StageResult | None]:
    """Learned tokens: from ``tokens.pt`` when present (finished or reused), else stage 1."""
    spec = ctx.spec
    path = workdir / "tokens.pt"
    identity = teacher_identity(spec)
    if path.is_file():
        tokens = load_tokens(
            path, plan.token_levels(), spec.stage1.tokens, spec.stage1.mask_weighting, identity
        )
        return tokens, None
    torch.manual_seed(spec.seed)
    tokens = TokenSet(
        [lv.teacher_channels for lv in plan.levels], spec.stage1.tokens, spec.stage1.mask_weighting
    )
    result = run_stage1(ctx, teacher, tokens, plan, workdir / "stage1" / "checkpoint.pt")
    ctx.callbacks.on_masks("stage1", result.step, _mask_overlays(ctx, teacher, tokens, plan))
    save_tokens(path, tokens, plan.token_levels(), identity)
    ctx.callbacks.on_artifact("stage1", "tokens", path)
    return tokens, result


def _evaluate_masked(
    ctx: TrainContext, teacher: nn.Module, tokens: TokenSet, plan: JobPlan
) -> dict[str, float]:
    metrics = evaluate_masked_teacher(ctx, teacher, tokens, plan)
    ctx.callbacks.on_eval("stage1", ctx.spec.stage1.iterations, metrics)
    return metrics


@dataclass
class _Shared:
    """What every student of a job shares: plan, data split, teacher, its metrics and tokens."""

    plan: JobPlan
    task: Task
    splits: Splits
    callbacks: Callback
    teacher: nn.Module
    metrics: dict[str, float]
    """The teacher's (and masked teacher's) evaluation."""
    tokens: TokenSet | None
    stage1: StageResult | None
    """None when stage 1 did not run here (no method needs it, or ``tokens.pt`` existed)."""
    tokens_path: Path | None


def _prepare(spec: JobSpec, workdir: Path, callbacks: Callbacks) -> _Shared:
    """Validate, build the data and the teacher, evaluate it and learn tokens if needed."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan = validate_job(spec)
    task = build_task(spec)
    splits = split_dataset(build_dataset(spec), spec.dataset.val_fraction, spec.seed)
    ctx = _context(spec, task, splits, _callback(callbacks))
    teacher = build_model(spec.teacher, plan.num_classes, field="teacher").to(ctx.device)
    metrics = _evaluate(ctx, teacher, "teacher", 0)
    tokens: TokenSet | None = None
    stage1: StageResult | None = None
    needs_tokens = job_needs_tokens(spec)
    if needs_tokens:
        tokens, stage1 = _stage1(ctx, teacher, plan, workdir)
        metrics.update(_evaluate_masked(ctx, teacher, tokens, plan))
    tokens_path = workdir / "tokens.pt" if needs_tokens else None
    return _Shared(plan, task, splits, ctx.callbacks, teacher, metrics, tokens, stage1, tokens_path)


def _train_student(
    ctx: TrainContext, shared: _Shared, workdir: Path, stage: Stage
) -> tuple[Path, StageResult, dict[str, float]]:
    """Stage 2 for ``ctx.spec``'s method and seed: ``workdir/student.pt`` and its metrics."""
    torch.manual_seed(ctx.spec.seed)
    student = build_model(ctx.spec.student, shared.plan.num_classes, field="student")
    checkpoint = workdir / "stage2" / "checkpoint.pt"
    result = run_stage2(ctx, shared.teacher, student, shared.tokens, shared.plan, checkpoint, stage)
    student_path = workdir / "student.pt"
    atomic_save({k: v.detach().cpu() for k, v in student.state_dict().items()}, student_path)
    ctx.callbacks.on_artifact(stage, "student", student_path)
    # A job's one student is evaluated as "eval" (the job's final numbers, on the parent run);
    # a comparison run's evaluation stays with its own stage so reporters keep runs apart.
    eval_stage = "eval" if stage == "stage2" else stage
    return student_path, result, _evaluate(ctx, student, "student", result.step, eval_stage)


def _summary(
    spec: JobSpec,
    shared: _Shared,
    metrics: Mapping[str, float],
    stages: Mapping[str, StageResult | None],
    device: torch.device,
) -> dict[str, Any]:
    """What ``summary.json`` holds for one student (a job's, or one comparison run's)."""
    return {
        "format": "maskd-summary/1",
        "job": spec.name,
        "task": spec.task,
        "primary_metric": shared.task.primary_metric,
        "metrics": dict(metrics),
        "method": spec.stage2.method.name,
        "seed": spec.seed,
        "steps": {
            "stage1": spec.stage1.iterations if shared.tokens is not None else 0,
            "stage2": spec.stage2.iterations,
        },
        "seconds_per_step": {
            name: result.seconds_per_step if result is not None else None
            for name, result in stages.items()
        },
        "plan": shared.plan.to_dict(),
        "device": str(device),
        "versions": _versions(),
    }


def run_job(
    spec: JobSpec, workdir: str | Path, callbacks: Callbacks = None, *, baseline: bool = False
) -> JobResult:
    """Run (or resume) the job ``spec`` in ``workdir`` and return where its outputs are.

    With ``baseline`` a second student, initialised identically, is trained on the task loss
    alone for the same steps, so the summary shows what distillation added. A spec with
    ``comparison`` is refused: ``run_comparison`` runs those.
    """
    if spec.comparison is not None:
        raise ValueError("a job with comparison runs through run_comparison, not run_job")
    workdir = Path(workdir)
    shared = _prepare(spec, workdir, callbacks)
    ctx = _context(spec, shared.task, shared.splits, shared.callbacks)
    student_path, stage2, student_metrics = _train_student(ctx, shared, workdir, "stage2")
    metrics = {**shared.metrics, **student_metrics}

    stages = {"stage1": shared.stage1, "stage2": stage2}
    if baseline:
        torch.manual_seed(spec.seed)
        plain = build_model(spec.student, shared.plan.num_classes, field="student")
        stages["baseline"] = train_supervised(
            ctx,
            plain,
            spec.stage2.optimizer,
            spec.stage2.iterations,
            workdir / "baseline" / "checkpoint.pt",
            stage="baseline",
        )
        metrics.update(_evaluate(ctx, plain, "baseline", spec.stage2.iterations))

    summary = _summary(spec, shared, metrics, stages, ctx.device)
    summary_path = workdir / "summary.json"
    _write_json(summary_path, summary)
    ctx.callbacks.on_artifact("eval", "summary", summary_path)
    return JobResult(workdir, shared.plan, shared.tokens_path, student_path, summary_path, summary)


@dataclass
class RunResult:
    """One (method, seed) student of a comparison; ``workdir`` is laid out like a job's."""

    method: MethodSpec
    seed: int
    stage: Stage
    """The stage name its callbacks carried (``comparison_stage``)."""
    workdir: Path
    student_path: Path
    summary_path: Path
    summary: dict[str, Any]

    @property
    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = self.summary["metrics"]
        return metrics


@dataclass
class ComparisonResult:
    """A finished comparison: every run, the table and where it was written."""

    workdir: Path
    plan: JobPlan
    tokens_path: Path | None
    runs: list[RunResult]
    table: dict[str, Any]
    table_path: Path
    markdown_path: Path


def run_dir(workdir: Path, method: str, seed: int) -> Path:
    return workdir / "runs" / f"{method}-seed{seed}"


def run_comparison(
    spec: JobSpec, workdir: str | Path, callbacks: Callbacks = None
) -> ComparisonResult:
    """Run (or resume) every (method, seed) of ``spec.comparison`` and tabulate them.

    Runs go method by method, seed by seed, so a cancelled comparison resumes with the
    finished runs skipped (their ``summary.json`` is read back) and the interrupted one
    continuing from its checkpoint.
    """
    if spec.comparison is None:
        raise ValueError("run_comparison needs a spec with a comparison section")
    workdir = Path(workdir)
    shared = _prepare(spec, workdir, callbacks)
    runs = []
    for method in spec.comparison.methods:
        for seed in spec.comparison.seeds:
            runs.append(_comparison_run(spec.run_spec(method, seed), shared, workdir))
    table = comparison_table(spec, shared.task.primary_metric, shared.metrics, runs)
    table_path = workdir / "comparison.json"
    markdown_path = workdir / "comparison.md"
    _write_json(table_path, table)
    _write_text(markdown_path, comparison_markdown(table))
    for path in (table_path, markdown_path):
        shared.callbacks.on_artifact("eval", "comparison", path)
    return ComparisonResult(
        workdir, shared.plan, shared.tokens_path, runs, table, table_path, markdown_path
    )


def _comparison_run(spec: JobSpec, shared: _Shared, workdir: Path) -> RunResult:
    """One run of a comparison (``spec`` from ``JobSpec.run_spec``); read back if finished."""
    method, seed = spec.stage2.method, spec.seed
    stage = comparison_stage(method.name, seed)
    rundir = run_dir(workdir, method.name, seed)
    summary_path = rundir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        rundir.mkdir(parents=True, exist_ok=True)
        ctx = _context(spec, shared.task, shared.splits, shared.callbacks)
        _, result, metrics = _train_student(ctx, shared, rundir, stage)
        summary = _summary(
            spec, shared, {**shared.metrics, **metrics}, {"stage2": result}, ctx.device
        )
        _write_json(summary_path, summary)
        ctx.callbacks.on_artifact(stage, "summary", summary_path)
    return RunResult(method, seed, stage, rundir, rundir / "student.pt", summary_path, summary)


def _effective_params(spec: JobSpec, method: MethodSpec) -> dict[str, Any]:
    """The method's params with its registry defaults spelled out (MasKD: its stage-2 weight)."""
    if method.name == "maskd":
        return {"loss_weight": spec.stage2.loss_weight}
    params = METHODS.parse_args(method.name, method.params, field="comparison.methods")
    return params.model_dump(mode="json")


def comparison_table(
    spec: JobSpec, primary: str, teacher_metrics: Mapping[str, float], runs: Sequence[RunResult]
) -> dict[str, Any]:
    """Per method, the student's primary metric over seeds (mean, sample std) and speed.

    The std is the sample standard deviation (0 with one seed). Seconds per step are averaged
    over the runs that measured them: a run resumed at its last step measured nothing.
    """
    assert spec.comparison is not None
    rows = []
    for method in spec.comparison.methods:
        mine = [run for run in runs if run.method.name == method.name]
        values = [run.metrics[f"student_{primary}"] for run in mine]
        speeds = [
            speed
            for run in mine
            if (speed := run.summary["seconds_per_step"]["stage2"]) is not None
        ]
        rows.append(
            {
                "method": method.name,
                "params": _effective_params(spec, method),
                "seeds": [run.seed for run in mine],
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seconds_per_step": statistics.fmean(speeds) if speeds else None,
            }
        )
    return {
        "format": "maskd-comparison/1",
        "job": spec.name,
        "task": spec.task,
        "primary_metric": primary,
        "teacher": teacher_metrics[f"teacher_{primary}"],
        "masked_teacher": teacher_metrics.get(f"masked_teacher_{primary}"),
        "iterations": spec.stage2.iterations,
        "seeds": list(spec.comparison.seeds),
        "methods": rows,
    }


def comparison_metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """The table as flat metrics (``fitnet_miou_mean``, ``fitnet_miou_std``, ``teacher_miou``),
    the shape MLflow's compare view and the job's metrics take."""
    primary = table["primary_metric"]
    metrics = {f"teacher_{primary}": float(table["teacher"])}
    for row in table["methods"]:
        metrics[f"{row['method']}_{primary}_mean"] = float(row["mean"])
        metrics[f"{row['method']}_{primary}_std"] = float(row["std"])
        if row["seconds_per_step"] is not None:
            metrics[f"{row['method']}_seconds_per_step"] = float(row["seconds_per_step"])
    return metrics


def comparison_markdown(table: Mapping[str, Any]) -> str:
    """The table as markdown, for the CLI, MLflow's artifact view and the bench."""
    primary = table["primary_metric"]
    lines = [
        f"{table['job']}: student {primary} after {table['iterations']} steps, mean ± std over "
        f"seeds {', '.join(str(s) for s in table['seeds'])}",
        "",
        f"| method | {primary} | per seed | s/step | params |",
        "|---|---|---|---|---|",
        f"| teacher | {table['teacher']:.4f} | | | |",
    ]
    for row in table["methods"]:
        speed = row["seconds_per_step"]
        lines.append(
            f"| {row['method']} | {row['mean']:.4f} ± {row['std']:.4f} | "
            f"{', '.join(f'{v:.4f}' for v in row['values'])} | "
            f"{'' if speed is None else f'{speed:.4f}'} | "
            f"{json.dumps(row['params'], sort_keys=True)} |"
        )
    return "\n".join(lines) + "\n"


def train_teacher(
    spec: JobSpec, out_path: str | Path, iterations: int, callbacks: Callbacks = None
) -> dict[str, float]:
    """Train ``spec.teacher``'s architecture from scratch on the job's data; save a state dict.

    Uses the stage-2 optimiser settings (the recipe the job trains its student with) over
    ``iterations`` steps. Resumable through ``<out_path>.ckpt``, removed once the state dict is
    written. Returns the trained teacher's validation metrics.
    """
    out = Path(out_path)
    task = build_task(spec)
    dataset = build_dataset(spec)
    splits = split_dataset(dataset, spec.dataset.val_fraction, spec.seed)
    ctx = _context(spec, task, splits, _callback(callbacks))
    torch.manual_seed(spec.seed)
    untrained = spec.teacher.model_copy(update={"weights": None})
    model = build_model(untrained, dataset.num_classes, field="teacher")
    checkpoint = out.with_name(out.name + ".ckpt")
    train_supervised(ctx, model, spec.stage2.optimizer, iterations, checkpoint, stage="teacher")
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
    checkpoint.unlink(missing_ok=True)
    ctx.callbacks.on_artifact("teacher", "teacher", out)
    return _evaluate(ctx, model, "teacher", iterations)
