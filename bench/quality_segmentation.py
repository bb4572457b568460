"""Teacher vs student without KD vs student with MasKD, at equal steps, over several seeds.

Each seed is an independent replicate: its own procedural data and split, its own teacher
(trained by ``train_teacher``), then one ``run_job(..., baseline=True)`` giving the MasKD
student and the no-KD student from the same initialisation and batches. Prints a markdown
table of mean ± std over seeds. Not a test: a measurement to record.

    .venv/bin/python bench/quality_segmentation.py                  # 3 seeds, quickstart spec
    .venv/bin/python bench/quality_segmentation.py --seeds 0 --teacher-iterations 300
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from maskd_cli.core_commands import load_spec
from maskd_core.runner import run_job, train_teacher
from maskd_core.spec import JobSpec

ROWS = [
    ("teacher", "teacher"),
    ("teacher masked by the tokens", "masked_teacher"),
    ("student, no KD", "baseline"),
    ("student, MasKD", "student"),
]


def with_trained_teacher(spec: JobSpec, teacher_path: Path, iterations: int) -> JobSpec:
    """``spec`` pointing at ``teacher_path``, trained on the spec's own data if not there yet."""
    spec = spec.model_copy(
        update={"teacher": spec.teacher.model_copy(update={"weights": str(teacher_path)})}
    )
    if not teacher_path.is_file():
        train_teacher(spec, teacher_path, iterations)
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", type=Path, default=Path("examples/quickstart-segmentation.yaml")
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-iterations", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-quality-segmentation"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_spec(args.config)
    results: dict[str, list[float]] = {key: [] for _, key in ROWS}
    metric = "miou"
    started = time.perf_counter()
    for seed in args.seeds:
        workdir = args.workdir / f"seed{seed}"
        spec = with_trained_teacher(
            base.model_copy(update={"seed": seed}), workdir / "teacher.pt", args.teacher_iterations
        )
        summary = run_job(spec, workdir / "job", baseline=True).runs[0].summary
        metric = summary["primary_metric"]
        for _, key in ROWS:
            results[key].append(summary["metrics"][f"{key}_{metric}"])
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in results.items()))

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f}"

    gain = [s - b for s, b in zip(results["student"], results["baseline"], strict=True)]
    print(
        f"\n{args.config.name}: teacher {args.teacher_iterations} steps, stage 1 "
        f"{base.stage1.iterations} steps, stage 2 / no-KD {base.stage2.iterations} steps, "
        f"seeds {args.seeds}, {time.perf_counter() - started:.0f} s\n"
    )
    print(f"| model | val {metric} (mean ± std) |\n|---|---|")
    for label, key in ROWS:
        print(f"| {label} | {cell(results[key])} |")
    print(f"| MasKD − no KD | {cell(gain)} |")


if __name__ == "__main__":
    main()
