"""A whole job: teacher → stage 1 → stage 2 → evaluation → files in the work directory.

``run_job`` is what the worker and ``maskd run`` call, for a single job and for a comparison
alike. It is resumable: stage 1 is finished once the tokens file exists (the worker may also
place reused tokens there), each loop continues from its own checkpoint, and a student whose
``summary.json`` exists is finished and read back. Calling ``run_job`` again in the same work
directory after a crash or a cancel therefore picks up where it stopped. ``maskd_core.workdir``
names every file.

Stage 1 runs only for methods that need tokens (MasKD); for the others no tokens are written
and ``JobResult.tokens_path`` is None.

A job trains one student with ``stage2.method``. A job with ``comparison`` shares the dataset,
its split, the teacher, its evaluation and stage 1 (once, if any method needs tokens), and
trains one student per (method, seed) in ``WorkDir.run(method, seed)``, laid out like a single
job's directory; the table goes to ``comparison.json`` and ``comparison.md``. Either way the
result is a ``JobResult`` whose ``runs`` are the students.

A teacher job (``kind: teacher``) is run by ``run_teacher_job`` instead: it trains the teacher
alone with ``teacher_training`` (``teacher_recipe``, which ``train_teacher`` behind ``maskd
train-teacher`` shares), resumable the same way, and writes ``teacher.pt`` with its
``model_spec.json`` and ``summary.json``.

A comparison run that fails on its own (``RunError``: its loss diverged) is recorded in its
directory's ``failure.json``, reported through ``Callback.on_run_failed`` and listed in the
table, and the comparison goes on; only when every run failed does the job fail
(``ComparisonFailed``). A rerun retries failed runs, since only a ``summary.json`` marks a run
finished.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchvision
from torch import nn

import maskd_core
from maskd_core.callbacks import (
    BASELINE,
    EVAL,
    STAGE1,
    STAGE2,
    TEACHER,
    Callback,
    CallbackList,
    Stage,
)
from maskd_core.checkpoint import atomic_save
from maskd_core.comparison import (
    comparison_markdown,
    comparison_metrics,
    comparison_table,
    failure_record,
)
from maskd_core.data import DenseDataset, build_dataset
from maskd_core.distributed import agree, ranks
from maskd_core.errors import ComparisonFailed, RunError
from maskd_core.evaluations import evaluation_key, load_evaluation, save_evaluation
from maskd_core.files import atomic_write_json, atomic_write_text, file_sha256
from maskd_core.loader import Splits, train_batches, train_val_split, val_batches
from maskd_core.mask_grid import mask_grid
from maskd_core.methods import effective_params, job_needs_tokens, method_setup
from maskd_core.models import build_model, model_document, with_default_layers
from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec, MethodSpec, OptimizerSpec
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
from maskd_core.tasks import Task, build_task
from maskd_core.tokens import TokenSet, load_tokens, save_tokens
from maskd_core.validate import validate_job
from maskd_core.workdir import WorkDir

Callbacks = Callback | Sequence[Callback] | None


@dataclass
class StudentRun:
    """One trained student: the job's own, or one (method, seed) of a comparison.

    ``spec`` is the run's own (``JobSpec.run_spec`` for a comparison run), ``stage`` the name
    its callbacks carried, ``summary`` its ``summary.json``.
    """

    spec: JobSpec
    stage: Stage
    workdir: WorkDir
    summary: dict[str, Any]

    @property
    def method(self) -> MethodSpec:
        return self.spec.stage2.method

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = self.summary["metrics"]
        return metrics


@dataclass
class JobResult:
    """A finished job: its students, the comparison table if any, and where the files are."""

    spec: JobSpec
    workdir: WorkDir
    plan: JobPlan
    tokens_path: Path | None
    """None for methods that learn no tokens."""
    runs: list[StudentRun]
    comparison: dict[str, Any] | None
    """The comparison table (``comparison.json``); None for a single job."""
    input_example: np.ndarray | None
    """Two validation images for a registered segmentation student's signature; None for
    detection, whose samples are not one image tensor."""
    failed: list[dict[str, Any]] = field(default_factory=list)
    """The comparison runs that failed on their own (``failure.json`` documents), absent from
    ``runs``: nothing of theirs is registered."""

    @property
    def metrics(self) -> dict[str, float]:
        """The job's student metrics, or the comparison table as flat metrics."""
        if self.comparison is not None:
            return comparison_metrics(self.comparison)
        return self.runs[0].metrics

    @property
    def files(self) -> dict[str, Path]:
        """The files a user asks for, by name."""
        if self.comparison is not None:
            files = {
                "comparison": self.workdir.comparison_table,
                "comparison_markdown": self.workdir.comparison_markdown,
            }
        else:
            files = {
                "student": self.runs[0].workdir.student,
                "summary": self.runs[0].workdir.summary,
            }
        if self.tokens_path is not None:
            files["tokens"] = self.tokens_path
        return files


def first_stage(spec: JobSpec, workdir: WorkDir) -> Literal["stage1", "stage2"]:
    """Where a (resumed) job starts: stage 2 once stage 1's tokens exist, or for methods that
    need none."""
    return "stage1" if job_needs_tokens(spec) and not workdir.tokens.exists() else "stage2"


def _callback(callbacks: Callbacks) -> Callback:
    if callbacks is None:
        return Callback()
    if isinstance(callbacks, Callback):
        return callbacks
    return CallbackList(callbacks)


def _context(spec: JobSpec, task: Task, splits: Splits, callbacks: Callback) -> TrainContext:
    """Training batches drawn by ``spec.seed`` from the given (train, val) split.

    The split is passed in rather than drawn here so that comparison runs with different
    seeds still train and evaluate on the same samples.
    """
    train_data, val_data = splits
    group = ranks()
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
            rank=group.rank,
            world_size=group.world_size,
        ),
        val_batches=lambda: val_batches(val_data, task, spec.batch_size, spec.num_workers),
        device=resolve_device(spec),
        callbacks=callbacks,
    )


def _evaluate(
    ctx: TrainContext, model: nn.Module, name: str, step: int, stage: Stage = EVAL
) -> dict[str, float]:
    """Evaluate and report ``model``; metric names are prefixed by what was evaluated."""
    metrics = ctx.evaluate(model, name)
    ctx.callbacks.on_eval(stage, step, metrics)
    return metrics


def teacher_identity(spec: JobSpec) -> dict[str, Any]:
    """What the tokens artifact records about the teacher, to refuse reuse on another one."""
    digest = file_sha256(spec.teacher.weights) if spec.teacher.weights is not None else None
    return {"arch": spec.teacher.arch, "args": dict(spec.teacher.args), "weights_sha256": digest}


def _mask_grids(
    ctx: TrainContext,
    teacher: nn.Module,
    tokens: TokenSet,
    metrics: Mapping[str, float],
) -> dict[str, np.ndarray]:
    """Per level, the first validation image and every token's mask on it in one labelled
    grid (``maskd_core.mask_grid``), titled with the masked-teacher check from ``metrics``."""
    batch = ctx.task.to_device(next(iter(ctx.val_batches())), ctx.device)
    image = ctx.task.example_input(batch)[0]
    image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-6)
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    check = _masked_teacher_check(metrics, ctx.task.primary_metric)
    grids = {}
    teacher.eval()
    with Taps(teacher, ctx.spec.teacher.tapped_layers) as taps, torch.no_grad():
        ctx.task.forward(teacher, batch)
        for k, feature in enumerate(taps.levels()):
            masks = tokens.level(k).masks(feature[:1])
            masks = torch.nn.functional.interpolate(masks, size=image.shape[-2:], mode="bilinear")
            channels, height, width = feature.shape[1:]
            title = [
                f"level {k}: teacher feature {channels}x{height}x{width}, {len(masks[0])} tokens"
            ]
            grids[f"level{k}"] = mask_grid(
                pixels, masks[0].clamp(0, 1).cpu().numpy(), [*title, check]
            )
    return grids


def _masked_teacher_check(metrics: Mapping[str, float], primary: str) -> str:
    """``masked teacher miou 0.412 (teacher 0.450)``: how much the masks keep of what the task
    needs, the number to read the mask grid beside."""
    masked = metrics.get(f"masked_teacher_{primary}")
    teacher = metrics.get(f"teacher_{primary}")
    if masked is None or teacher is None:
        return f"masked teacher {primary}: not evaluated"
    return f"masked teacher {primary} {masked:.3f} (teacher {teacher:.3f})"


def _versions() -> dict[str, str]:
    return {
        "maskd": maskd_core.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _stage1(
    ctx: TrainContext, teacher: nn.Module, plan: JobPlan, workdir: WorkDir
) -> tuple[TokenSet, StageResult | None]:
    """Learned tokens: from the tokens file when present (finished or reused), else stage 1."""
    spec = ctx.spec
    identity = teacher_identity(spec)
    if agree(workdir.tokens.is_file()):
        tokens = load_tokens(
            workdir.tokens,
            plan.token_levels(),
            spec.stage1.tokens,
            spec.stage1.mask_weighting,
            identity,
        )
        return tokens, None
    torch.manual_seed(spec.seed)
    tokens = TokenSet(
        [lv.teacher_channels for lv in plan.levels], spec.stage1.tokens, spec.stage1.mask_weighting
    )
    result = run_stage1(ctx, teacher, tokens, plan, workdir.checkpoint("stage1"))
    if ranks().is_main:
        save_tokens(workdir.tokens, tokens, plan.token_levels(), identity)
        ctx.callbacks.on_artifact(STAGE1, "tokens", workdir.tokens)
    return tokens, result


def _input_example(spec: JobSpec, dataset: DenseDataset) -> np.ndarray | None:
    if spec.task != "segmentation":
        return None
    images = [dataset[index][0].numpy() for index in range(min(2, len(dataset)))]
    return np.stack(images).astype(np.float32)


def _stored_evaluation(
    ctx: TrainContext,
    workdir: WorkDir,
    name: str,
    evaluate: Callable[[], dict[str, float]],
    tokens: Path | None = None,
) -> dict[str, float]:
    """The frozen teacher's evaluation ``name``: read back when an earlier attempt of the job
    stored it under the same key, else computed by ``evaluate`` and stored
    (``maskd_core.evaluations``). A resumed attempt thus reaches its first step without a pass
    over the validation data. Only rank 0 evaluates (``TrainContext.evaluate``)."""
    if not ranks().is_main:
        return {}
    key = evaluation_key(ctx.spec, device=str(ctx.device), versions=_versions(), tokens=tokens)
    path = workdir.evaluation(name)
    metrics = load_evaluation(path, key)
    if metrics is None:
        metrics = evaluate()
        save_evaluation(path, key, metrics)
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
    """None when stage 1 did not run here (no method needs it, or the tokens file existed)."""
    input_example: np.ndarray | None


def _prepare(spec: JobSpec, workdir: WorkDir, callbacks: Callbacks) -> _Shared:
    """Build the data and the teacher once, validate with them, evaluate the teacher and learn
    tokens if any method needs them."""
    task = build_task(spec)
    dataset = build_dataset(spec)
    torch.manual_seed(spec.seed)  # a teacher without weights is the same on every attempt
    teacher = build_model(spec.teacher, dataset.num_classes, field="teacher")
    plan = validate_job(spec, dataset=dataset, teacher=teacher)
    spec = with_default_layers(spec)  # after validate_job, which refuses defaults that don't pair
    splits = train_val_split(spec, dataset)
    ctx = _context(spec, task, splits, _callback(callbacks))
    ctx.callbacks.on_plan(plan)  # the pairing is shown from here on, not only once registered
    teacher.to(ctx.device)
    metrics = _stored_evaluation(ctx, workdir, "teacher", partial(ctx.evaluate, teacher, "teacher"))
    ctx.callbacks.on_eval(EVAL, 0, metrics)
    tokens: TokenSet | None = None
    stage1: StageResult | None = None
    if job_needs_tokens(spec):
        tokens, stage1 = _stage1(ctx, teacher, plan, workdir)
        tokens.to(ctx.device)  # where the masked evaluation, when it runs, leaves them
        masked = _stored_evaluation(
            ctx,
            workdir,
            "masked_teacher",
            partial(evaluate_masked_teacher, ctx, teacher, tokens, plan),
            tokens=workdir.tokens,
        )
        ctx.callbacks.on_eval(STAGE1, spec.stage1.iterations, masked)
        metrics.update(masked)
        if stage1 is not None and ranks().is_main:
            grids = _mask_grids(ctx, teacher, tokens, metrics)
            ctx.callbacks.on_masks(STAGE1, stage1.step, grids)
    return _Shared(
        plan,
        task,
        splits,
        ctx.callbacks,
        teacher,
        metrics,
        tokens,
        stage1,
        _input_example(spec, dataset),
    )


def _save_student(student: nn.Module, spec: JobSpec, plan: JobPlan, rundir: WorkDir) -> None:
    """The state dict, and the document that rebuilds its network without the job spec
    (rank 0's to write)."""
    if not ranks().is_main:
        return
    atomic_save({k: v.detach().cpu() for k, v in student.state_dict().items()}, rundir.student)
    atomic_write_json(
        rundir.model_spec, model_document(spec.distilled_student, plan.num_classes, spec.task)
    )


def _student_run(
    spec: JobSpec, stage: Stage, rundir: WorkDir, shared: _Shared, *, baseline: bool = False
) -> StudentRun:
    """Stage 2 for ``spec``'s method and seed in ``rundir``; read back when already finished.

    With ``baseline`` a second student, initialised identically, is trained on the task loss
    alone for the same steps, so the summary shows what distillation added.
    """
    if agree(rundir.summary.is_file()):
        return StudentRun(spec, stage, rundir, json.loads(rundir.summary.read_text()))
    rundir.create()
    ctx = _context(spec, shared.task, shared.splits, shared.callbacks)
    # A job's one student is evaluated as "eval" (the job's final numbers); a comparison run's
    # evaluation stays with its own stage, so reporters keep the runs apart.
    report = stage if stage.is_comparison_run else EVAL
    torch.manual_seed(spec.seed)
    student = build_model(spec.distilled_student, shared.plan.num_classes, field="student")
    stage2 = run_stage2(
        ctx, shared.teacher, student, shared.tokens, shared.plan, rundir.checkpoint("stage2"), stage
    )
    _save_student(student, spec, shared.plan, rundir)
    ctx.callbacks.on_artifact(stage, "student", rundir.student)
    final = _final_evaluation(ctx, student, "student", stage2, stage, report)
    metrics = {**shared.metrics, **final}
    loops = {"stage1": shared.stage1, "stage2": stage2}
    if baseline:
        torch.manual_seed(spec.seed)
        plain = build_model(spec.distilled_student, shared.plan.num_classes, field="student")
        plain_result = train_supervised(
            ctx,
            plain,
            spec.stage2.optimizer,
            spec.stage2.iterations,
            rundir.checkpoint("baseline"),
            stage=BASELINE,
        )
        loops["baseline"] = plain_result
        metrics.update(_final_evaluation(ctx, plain, "baseline", plain_result, BASELINE, EVAL))
    summary = _summary(spec, shared, metrics, loops, ctx.device)
    if ranks().is_main:
        atomic_write_json(rundir.summary, summary)
        ctx.callbacks.on_artifact(report, "summary", rundir.summary)
    return StudentRun(spec, stage, rundir, summary)


def _final_evaluation(
    ctx: TrainContext,
    model: nn.Module,
    name: str,
    trained: StageResult,
    stage: Stage,
    report: Stage,
) -> dict[str, float]:
    """The final evaluation of ``model`` (metrics prefixed ``name``), reported on ``report``.

    When the loop that trained it (``trained``, reported as ``stage``) evaluated at its last
    step (``eval_every``), that evaluation is the final one: it already closed the stage's
    curve, so it is reported again only when ``report`` is another stage (a single job's
    "eval", its final numbers), and never computed twice.
    """
    if trained.final_evaluation is None:
        return _evaluate(ctx, model, name, trained.step, report)
    if report != stage:
        ctx.callbacks.on_eval(report, trained.step, trained.final_evaluation)
    return trained.final_evaluation


def _summary(
    spec: JobSpec,
    shared: _Shared,
    metrics: Mapping[str, float],
    loops: Mapping[str, StageResult | None],
    device: torch.device,
) -> dict[str, Any]:
    """What ``summary.json`` holds for one student (a job's, or one comparison run's).

    ``method_params`` are the method's params as the run used them, defaults spelled out (a
    weight that followed the task or the student's family included); ``inherited_from_teacher``
    says what the student took from the teacher (``stage2.inherit_teacher_weights``), or null.
    """
    stage2 = loops.get("stage2")
    inherited = stage2.inherited if stage2 is not None else None
    return {
        "format": "maskd-summary/1",
        "job": spec.name,
        "task": spec.task,
        "primary_metric": shared.task.primary_metric,
        "metrics": dict(metrics),
        "method": spec.stage2.method.name,
        "method_params": effective_params(
            method_setup(spec, shared.plan, spec.stage2.method, shared.tokens)
        ),
        "inherited_from_teacher": None if inherited is None else inherited.to_dict(),
        "seed": spec.seed,
        "steps": {
            "stage1": spec.stage1.iterations if shared.tokens is not None else 0,
            "stage2": spec.stage2.iterations,
        },
        "seconds_per_step": {
            name: result.seconds_per_step if result is not None else None
            for name, result in loops.items()
        },
        "plan": shared.plan.to_dict(),
        "device": str(device),
        "processes": ranks().world_size,
        "versions": _versions(),
    }


def _comparison_run(
    spec: JobSpec, method: MethodSpec, seed: int, root: WorkDir, shared: _Shared
) -> StudentRun | dict[str, Any]:
    """One (method, seed) of a comparison: its student, or its failure record when it failed on
    its own. Errors that are not the run's (data, cancellation, the machine) propagate: they
    would hit every run, so the job stops with them as it would without a comparison."""
    stage = Stage.comparison_run(method.name, seed)
    rundir = root.run(method.name, seed)
    try:
        run = _student_run(spec.run_spec(method, seed), stage, rundir, shared)
    except RunError as error:
        failure = failure_record(method.name, seed, str(stage), error)
        if ranks().is_main:
            atomic_write_json(rundir.create().failure, failure)
        shared.callbacks.on_run_failed(stage, str(error))
        return failure
    # A retried run that finished is no longer a failed one.
    if ranks().is_main:
        rundir.failure.unlink(missing_ok=True)
    return run


def run_job(
    spec: JobSpec, workdir: str | Path, callbacks: Callbacks = None, *, baseline: bool = False
) -> JobResult:
    """Run (or resume) the job ``spec`` in ``workdir`` and return its students and files.

    A comparison runs method by method, seed by seed, so a cancelled one resumes with the
    finished runs read back and the interrupted one continuing from its checkpoint. A run that
    fails on its own is tabulated as failed while the others go on; ``ComparisonFailed`` is
    raised, after the table is written, only when every run failed.
    ``baseline`` (a no-KD student beside the job's one) is for single jobs: a comparison lists
    method ``none`` instead.
    """
    if baseline and spec.comparison is not None:
        raise ValueError("a comparison compares against method 'none', not a baseline")
    root = WorkDir(Path(workdir)).create()
    shared = _prepare(spec, root, callbacks)
    spec = with_default_layers(spec)  # the layers _prepare's plan pairs, for every run
    if spec.comparison is None:
        runs = [_student_run(spec, STAGE2, root, shared, baseline=baseline)]
        table = None
        failed: list[dict[str, Any]] = []
    else:
        outcomes = [
            _comparison_run(spec, method, seed, root, shared)
            for method in spec.comparison.methods
            for seed in spec.comparison.seeds
        ]
        runs = [outcome for outcome in outcomes if isinstance(outcome, StudentRun)]
        failed = [outcome for outcome in outcomes if not isinstance(outcome, StudentRun)]
        # Only rank 0 evaluated: the other ranks' runs have no metrics to tabulate.
        table = None
        if ranks().is_main:
            table = comparison_table(
                spec,
                shared.plan,
                shared.task.primary_metric,
                shared.metrics,
                [run.summary for run in runs],
                failed,
            )
            atomic_write_json(root.comparison_table, table)
            atomic_write_text(root.comparison_markdown, comparison_markdown(table))
            for path in (root.comparison_table, root.comparison_markdown):
                shared.callbacks.on_artifact(EVAL, "comparison", path)
        if not runs:
            raise ComparisonFailed([(failure["stage"], failure["reason"]) for failure in failed])
    tokens_path = root.tokens if shared.tokens is not None else None
    return JobResult(
        spec, root, shared.plan, tokens_path, runs, table, shared.input_example, failed
    )


@dataclass(frozen=True)
class TeacherRecipe:
    """How a teacher is trained (``teacher_recipe``): supervised, on the task loss alone."""

    optimizer: OptimizerSpec
    optimizer_field: str
    """Where ``optimizer`` sits in the spec: what a diverged run names."""
    iterations: int


def teacher_recipe(spec: JobSpec, iterations: int | None = None) -> TeacherRecipe:
    """How ``spec``'s teacher is trained: ``teacher_training`` when the spec has it, else stage
    2's optimiser (the recipe ``maskd train-teacher`` used before teachers had their own);
    ``iterations`` (the command's ``--iterations``) overrides the step count."""
    if spec.teacher_training is not None:
        steps = spec.teacher_training.iterations if iterations is None else iterations
        return TeacherRecipe(spec.teacher_training.optimizer, "teacher_training.optimizer", steps)
    steps = spec.stage2.iterations if iterations is None else iterations
    return TeacherRecipe(spec.stage2.optimizer, "stage2.optimizer", steps)


@dataclass
class TeacherResult:
    """A finished teacher job: the trained network's files and its validation metrics."""

    spec: JobSpec
    workdir: WorkDir
    num_classes: int
    summary: dict[str, Any]
    input_example: np.ndarray | None
    """Two validation images for the registered teacher's signature (as a student's)."""

    @property
    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = self.summary["metrics"]
        return metrics

    @property
    def files(self) -> dict[str, Path]:
        return {"teacher": self.workdir.teacher, "summary": self.workdir.summary}


def _train_teacher_network(
    spec: JobSpec,
    out: Path,
    checkpoint: Path,
    recipe: TeacherRecipe,
    callbacks: Callbacks,
    *,
    from_weights: bool,
) -> tuple[nn.Module, TrainContext, StageResult, DenseDataset]:
    """``spec.teacher`` trained by ``recipe`` on the job's training split and saved to ``out``
    (a state dict); from its ``weights`` with ``from_weights``, else from scratch."""
    task = build_task(spec)
    dataset = build_dataset(spec)
    splits = train_val_split(spec, dataset)
    ctx = _context(spec, task, splits, _callback(callbacks))
    torch.manual_seed(spec.seed)  # the same initialisation on every attempt
    start = spec.teacher if from_weights else spec.teacher.model_copy(update={"weights": None})
    model = build_model(start, dataset.num_classes, field="teacher")
    trained = train_supervised(
        ctx,
        model,
        recipe.optimizer,
        recipe.iterations,
        checkpoint,
        stage=TEACHER,
        optimizer_field=recipe.optimizer_field,
    )
    if ranks().is_main:
        atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out)
        ctx.callbacks.on_artifact(TEACHER, "teacher", out)
    return model, ctx, trained, dataset


def train_teacher(
    spec: JobSpec,
    out_path: str | Path,
    iterations: int | None = None,
    callbacks: Callbacks = None,
) -> dict[str, float]:
    """Train ``spec.teacher``'s architecture from scratch on the job's data; save a state dict.

    The recipe is ``teacher_recipe``'s: ``teacher_training``, else stage 2's optimiser;
    ``iterations`` overrides its steps. From scratch, since the spec's ``teacher.weights``
    usually names the file this writes. Resumable through ``<out_path>.ckpt``, removed once the
    state dict is written. Returns the trained teacher's validation metrics.
    """
    out = Path(out_path)
    recipe = teacher_recipe(spec, iterations)
    checkpoint = out.with_name(out.name + ".ckpt")
    model, ctx, trained, _ = _train_teacher_network(
        spec, out, checkpoint, recipe, callbacks, from_weights=False
    )
    checkpoint.unlink(missing_ok=True)
    return _final_evaluation(ctx, model, "teacher", trained, TEACHER, EVAL)


def run_teacher_job(
    spec: JobSpec, workdir: str | Path, callbacks: Callbacks = None
) -> TeacherResult:
    """Run (or resume) the teacher job ``spec`` (``kind: teacher``) in ``workdir``.

    Trains ``teacher.arch`` with ``teacher_training`` (from ``teacher.weights`` when given:
    a fine-tune), evaluates it on the validation data and writes the state dict, the document
    that rebuilds its network and a summary, as a job does for its student, so the worker
    registers it the same way. A finished job (its summary written) is read back.
    """
    if spec.kind != "teacher":
        raise ValueError(f"job {spec.name!r} is a {spec.kind} job; run it with run_job")
    root = WorkDir(Path(workdir)).create()
    recipe = teacher_recipe(spec)
    if agree(root.summary.is_file()):
        summary = json.loads(root.summary.read_text())
        example = _input_example(spec, build_dataset(spec))
        return TeacherResult(spec, root, summary["num_classes"], summary, example)
    model, ctx, trained, dataset = _train_teacher_network(
        spec, root.teacher, root.checkpoint("teacher"), recipe, callbacks, from_weights=True
    )
    metrics = _final_evaluation(ctx, model, "teacher", trained, TEACHER, EVAL)
    summary = {
        "format": "maskd-teacher-summary/1",
        "job": spec.name,
        "task": spec.task,
        "primary_metric": ctx.task.primary_metric,
        "metrics": dict(metrics),
        "num_classes": dataset.num_classes,
        "seed": spec.seed,
        "steps": {"teacher": recipe.iterations},
        "seconds_per_step": {"teacher": trained.seconds_per_step},
        "device": str(ctx.device),
        "processes": ranks().world_size,
        "versions": _versions(),
    }
    if ranks().is_main:
        atomic_write_json(
            root.model_spec, model_document(spec.teacher, dataset.num_classes, spec.task)
        )
        atomic_write_json(root.summary, summary)
        ctx.callbacks.on_artifact(EVAL, "summary", root.summary)
    return TeacherResult(spec, root, dataset.num_classes, summary, _input_example(spec, dataset))
