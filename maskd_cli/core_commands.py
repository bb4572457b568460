"""Commands that run the core library locally: ``maskd run``, ``maskd train-teacher``.

Both read a job spec from YAML. A spec that cannot run (structure, names, layers, channels)
prints what to fix and exits with status 2 before anything trains.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maskd_core.callbacks import Callback, Stage
    from maskd_core.spec import JobSpec

SPEC_ERROR_EXIT = 2


FALLBACK_TEACHER_ITERATIONS = 1000
"""``maskd train-teacher``'s steps for a spec without ``teacher_training``: the command's default
before teachers had a recipe of their own, kept so such specs train the teacher they always did."""


def register(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="run a MasKD job locally: stage 1 (tokens) then stage 2 (distillation)",
        description="Validate JOB.yaml, learn receptive tokens on the teacher, distil the "
        "student and print the metrics. A spec with a comparison section trains one student "
        "per (method, seed) and prints the comparison table. Rerunning with the same "
        "--workdir resumes.",
    )
    run.add_argument("job", type=Path, metavar="JOB.yaml")
    run.add_argument(
        "--workdir", type=Path, help="where checkpoints and outputs go (default runs/<job name>)"
    )
    run.add_argument(
        "--baseline",
        action="store_true",
        help="also train the student without distillation (same seed and steps) to compare",
    )
    run.set_defaults(func=run_command)

    teacher = subparsers.add_parser(
        "train-teacher",
        help="train the job's teacher architecture on its dataset (no distillation)",
        description="Train JOB.yaml's teacher architecture from scratch on the job's dataset "
        "with its teacher_training recipe (without one: stage2.optimizer for "
        f"{FALLBACK_TEACHER_ITERATIONS} steps) and save a state dict for teacher.weights.",
    )
    teacher.add_argument("job", type=Path, metavar="JOB.yaml")
    teacher.add_argument("--out", type=Path, required=True, help="state dict file to write")
    teacher.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="training steps (default: teacher_training.iterations, else "
        f"{FALLBACK_TEACHER_ITERATIONS})",
    )
    teacher.set_defaults(func=train_teacher_command)


def load_spec(path: Path) -> JobSpec:
    """Parse a YAML job spec; raises ``SpecError`` with a readable message when it is invalid."""
    from pydantic import ValidationError

    from maskd_cli.spec_files import SpecFileError, read_spec_file
    from maskd_core.errors import SpecError
    from maskd_core.spec import JobSpec

    try:
        data = read_spec_file(path)
    except SpecFileError as exc:
        raise SpecError(str(exc)) from None
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc']) or '(spec)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise SpecError(f"{str(path)!r} is not a valid job spec:\n{problems}") from None


def _report_spec_error(error: Exception) -> int:
    field = getattr(error, "field", None)
    where = f" [{field}]" if field else ""
    print(f"error{where}: {error}", file=sys.stderr)
    return SPEC_ERROR_EXIT


def _progress() -> Callback:
    """A tqdm bar per stage, with evaluations printed above the bars."""
    from tqdm import tqdm

    from maskd_core.callbacks import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.bar: Any = None

        def on_stage_start(
            self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
        ) -> None:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=str(stage), unit="step")

        def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                {k: f"{v:.4g}" for k, v in metrics.items() if k != "images_per_sec"},
                refresh=False,
            )

        def on_stage_end(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
            self.bar.close()

        def on_eval(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
            tqdm.write(", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    return Progress()


def metrics_table(summary: Mapping[str, Any]) -> str:
    """The teacher, the MasKD student and (when trained) the no-KD student, as markdown."""
    metric = summary["primary_metric"]
    rows = [
        ("teacher", "teacher"),
        ("teacher, masked by the tokens", "masked_teacher"),
        ("student with MasKD", "student"),
        ("student without KD", "baseline"),
    ]
    metrics = summary["metrics"]
    lines = [f"| model | {metric} |", "|---|---|"]
    lines += [
        f"| {label} | {metrics[f'{key}_{metric}']:.4f} |"
        for label, key in rows
        if f"{key}_{metric}" in metrics
    ]
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    from maskd_core.errors import SpecError

    try:
        # Read before torch is imported (seconds), so a bad file is refused at once.
        spec = load_spec(args.job)
        from maskd_core.comparison import comparison_markdown
        from maskd_core.distributed import run_in_processes
        from maskd_core.runner import run_job, run_teacher_job

        if spec.kind == "teacher":
            if args.baseline:
                raise SpecError("--baseline is for distillation jobs", field="kind")
            workdir = args.workdir or Path("runs") / spec.name
            trained = run_in_processes(run_teacher_job, spec, workdir, _progress())
            print(metrics_table(trained.summary))
            print(f"outputs in {workdir}: {', '.join(p.name for p in trained.files.values())}")
            return 0
        if spec.comparison is not None and args.baseline:
            raise SpecError(
                "--baseline is for single-method jobs; a comparison lists method 'none' "
                "instead, trained on the same seeds",
                field="comparison.methods",
            )
        if args.baseline and spec.resources.world_size > 1:
            raise SpecError(
                "--baseline trains its second student in one process; run it without "
                "resources, or drop --baseline",
                field="resources",
            )
        workdir = args.workdir or Path("runs") / spec.name
        if args.baseline:
            result = run_job(spec, workdir, _progress(), baseline=True)
        else:
            result = run_in_processes(run_job, spec, workdir, _progress())
    except SpecError as error:
        return _report_spec_error(error)
    if result.comparison is not None:
        print(comparison_markdown(result.comparison), end="")
    else:
        print(metrics_table(result.runs[0].summary))
    print(f"outputs in {workdir}: {', '.join(path.name for path in result.files.values())}")
    return 0


def train_teacher_command(args: argparse.Namespace) -> int:
    from maskd_core.errors import SpecError
    from maskd_core.runner import train_teacher

    try:
        spec = load_spec(args.job)
        iterations = args.iterations
        if iterations is None and spec.teacher_training is None:
            iterations = FALLBACK_TEACHER_ITERATIONS
        train_teacher(spec, args.out, iterations, _progress())  # progress prints metrics
    except SpecError as error:
        return _report_spec_error(error)
    print(f"teacher weights written to {args.out}")
    return 0
