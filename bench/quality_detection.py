"""Does MasKD help a detector? Student without KD vs with MasKD vs its teacher, equal steps.

Runs the detection quickstart recipe (``examples/quickstart-detection.yaml``: FCOS with a tiny
backbone on procedurally generated shapes, CPU) once per seed: train the teacher, learn the
tokens, distil the student, and train the same student without distillation for the same
steps from the same initialisation. Each seed also draws its own train/val split, so the
teacher is retrained per seed rather than shared (a shared teacher would have trained on
another seed's validation images). Prints one markdown table of COCO box mAP, mean ± std over
the seeds, and the per-seed numbers.

    .venv/bin/python bench/quality_detection.py    # 3 seeds, the quickstart's steps, ~10-15 min
    .venv/bin/python bench/quality_detection.py --seeds 0 --teacher-steps 300 --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml

from maskd_core.runner import run_job, train_teacher
from maskd_core.spec import JobSpec

RECIPE = Path(str(files("maskd_examples") / "quickstart-detection.yaml"))
ROWS = (
    ("teacher", "teacher_map"),
    ("teacher, masked by the tokens", "masked_teacher_map"),
    ("student without KD", "baseline_map"),
    ("student with MasKD", "student_map"),
)


def spec_for(base: dict[str, Any], seed: int, args: argparse.Namespace, teacher: Path) -> JobSpec:
    data = {**base, "seed": seed, "name": f"bench-detection-seed{seed}"}
    data["teacher"] = {**base["teacher"], "weights": str(teacher)}
    data["stage1"] = {**base["stage1"], "iterations": args.stage1_steps}
    data["stage2"] = {**base["stage2"], "iterations": args.steps}
    return JobSpec.model_validate(data)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=500, help="stage-2 and baseline steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: best on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = yaml.safe_load(RECIPE.read_text())

    results: list[dict[str, float]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maskd-bench-det-") as tmp:
        for seed in args.seeds:
            tic = time.perf_counter()
            teacher = Path(tmp) / f"teacher-{seed}.pt"
            spec = spec_for(base, seed, args, teacher)
            train_teacher(spec, teacher, args.teacher_steps)
            summary = run_job(spec, Path(tmp) / f"seed{seed}", baseline=True).runs[0].summary
            results.append(summary["metrics"])
            print(
                f"seed {seed}: "
                + ", ".join(f"{label} {summary['metrics'][key]:.4f}" for label, key in ROWS)
                + f" ({time.perf_counter() - tic:.0f} s)",
                flush=True,
            )

    print()
    print(
        f"COCO box mAP on procedural_boxes ({RECIPE.name}), teacher {args.teacher_steps} steps, "
        f"stage 1 {args.stage1_steps} steps, students {args.steps} steps, seeds {args.seeds}, "
        f"{torch.get_num_threads()} CPU threads, {time.perf_counter() - started:.0f} s in all"
    )
    print()
    print("| model | mAP (mean ± std) | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    for label, key in ROWS:
        values = [metrics[key] for metrics in results]
        cells = " | ".join(f"{v:.4f}" for v in values)
        print(f"| {label} | {mean_std(values)} | {cells} |")
    gains = [m["student_map"] - m["baseline_map"] for m in results]
    print(f"| MasKD − no KD | {mean_std(gains)} | " + " | ".join(f"{g:+.4f}" for g in gains) + " |")


if __name__ == "__main__":
    main()
