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
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
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
from maskd_core.callbacks import Callback, CallbackList
from maskd_core.checkpoint import atomic_save
from maskd_core.data import DenseDataset
from maskd_core.data.loader import split_dataset, train_batches, val_batches
from maskd_core.methods import METHODS
from maskd_core.models import build_model
from maskd_core.spec import JobSpec
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


def _context(spec: JobSpec, task: Task, dataset: DenseDataset, callbacks: Callback) -> TrainContext:
    train_data, val_data = split_dataset(dataset, spec.dataset.val_fraction, spec.seed)
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


def _evaluate(ctx: TrainContext, model: nn.Module, name: str, step: int) -> dict[str, float]:
    """Evaluate and report ``model``; metric names are prefixed by what was evaluated."""
    metrics = ctx.evaluate(model, name)
    ctx.callbacks.on_eval("eval", step, metrics)
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
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


def run_job(
    spec: JobSpec, workdir: str | Path, callbacks: Callbacks = None, *, baseline: bool = False
) -> JobResult:
    """Run (or resume) the job ``spec`` in ``workdir`` and return where its outputs are.

    With ``baseline`` a second student, initialised identically, is trained on the task loss
    alone for the same steps, so the summary shows what distillation added.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = validate_job(spec)
    task = build_task(spec)
    ctx = _context(spec, task, build_dataset(spec), _callback(callbacks))
    teacher = build_model(spec.teacher, plan.num_classes, field="teacher").to(ctx.device)
    metrics = _evaluate(ctx, teacher, "teacher", 0)

    tokens: TokenSet | None = None
    stage1: StageResult | None = None
    needs_tokens = METHODS.get(spec.stage2.method.name, field="stage2.method.name").needs_tokens
    if needs_tokens:
        tokens, stage1 = _stage1(ctx, teacher, plan, workdir)
        metrics.update(_evaluate_masked(ctx, teacher, tokens, plan))

    torch.manual_seed(spec.seed)
    student = build_model(spec.student, plan.num_classes, field="student")
    stage2 = run_stage2(ctx, teacher, student, tokens, plan, workdir / "stage2" / "checkpoint.pt")
    student_path = workdir / "student.pt"
    atomic_save({k: v.detach().cpu() for k, v in student.state_dict().items()}, student_path)
    ctx.callbacks.on_artifact("stage2", "student", student_path)
    metrics.update(_evaluate(ctx, student, "student", stage2.step))

    stages = {"stage1": stage1, "stage2": stage2}
    if baseline:
        torch.manual_seed(spec.seed)
        plain = build_model(spec.student, plan.num_classes, field="student")
        stages["baseline"] = train_supervised(
            ctx,
            plain,
            spec.stage2.optimizer,
            spec.stage2.iterations,
            workdir / "baseline" / "checkpoint.pt",
            stage="baseline",
        )
        metrics.update(_evaluate(ctx, plain, "baseline", spec.stage2.iterations))

    summary = {
        "format": "maskd-summary/1",
        "job": spec.name,
        "task": spec.task,
        "primary_metric": task.primary_metric,
        "metrics": metrics,
        "method": spec.stage2.method.name,
        "steps": {
            "stage1": spec.stage1.iterations if needs_tokens else 0,
            "stage2": spec.stage2.iterations,
        },
        "seconds_per_step": {
            name: result.seconds_per_step if result is not None else None
            for name, result in stages.items()
        },
        "plan": plan.to_dict(),
        "device": str(ctx.device),
        "versions": _versions(),
    }
    summary_path = workdir / "summary.json"
    _write_json(summary_path, summary)
    ctx.callbacks.on_artifact("eval", "summary", summary_path)
    tokens_path = workdir / "tokens.pt" if needs_tokens else None
    return JobResult(workdir, plan, tokens_path, student_path, summary_path, summary)


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
    ctx = _context(spec, task, dataset, _callback(callbacks))
    torch.manual_seed(spec.seed)
    untrained = spec.teacher.model_copy(update={"weights": None})
    model = build_model(untrained, dataset.num_classes, field="teacher")
    checkpoint = out.with_name(out.name + ".ckpt")
    train_supervised(ctx, model, spec.stage2.optimizer, iterations, checkpoint, stage="teacher")
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
    checkpoint.unlink(missing_ok=True)
    ctx.callbacks.on_artifact("teacher", "teacher", out)
    return _evaluate(ctx, model, "teacher", iterations)
