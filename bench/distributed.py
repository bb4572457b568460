"""Stage-2 steps/s of one job on 1, 2, ... processes, and the scaling efficiency between them.

Each count N runs a real job (``maskd_core.distributed.run_in_processes``: rank 0 here, the
others started beside it) with the same global batch, so each process takes batch/N of every
step: strong scaling, the speed-up a user sees for an unchanged spec. Rank 0 times its stage-2
steps (median of the step intervals after ``--warmup`` steps); efficiency is
``(steps/s at N) / (steps/s at 1) / N``. On GPUs it also reports rank 0's peak memory (the
ranks are symmetric) with the chosen mixed precision.

CPU, gloo (what CI machines can run; on two cores the processes share the cores one process
would use, so expect efficiency well below 1):

    .venv/bin/python bench/distributed.py --processes 1 2

A GPU host, NCCL with bf16, every count up to the GPUs present, then the S1 ratio (stage-2
step ÷ teacher no-grad forward + student step) with AMP, in about ten minutes at most:

    timeout 600 .venv/bin/python bench/distributed.py --gpus all --mixed-precision bf16 \\
        --teacher deeplabv3_resnet50 --student deeplabv3_resnet18 --layers classifier \\
        --image-size 512 --batch-size 16 --steps 30 --s1-ratio
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from maskd_core.callbacks import STAGE2, Callback, Stage
from maskd_core.distributed import run_in_processes
from maskd_core.runner import run_job
from maskd_core.spec import JobSpec


class Stage2Clock(Callback):
    """Rank 0's stage-2 step times and, on CUDA, its peak memory."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.peak_bytes = 0

    def on_step(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        if stage == STAGE2:
            self.times.append(time.perf_counter())

    def on_stage_end(self, stage: Stage, step: int, metrics: Mapping[str, float]) -> None:
        if stage == STAGE2 and torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated()


def job_spec(args: argparse.Namespace, count: int) -> JobSpec:
    resources = {"gpus": count} if args.gpus else {"processes": count}
    return JobSpec.model_validate(
        {
            "name": f"bench-distributed-{count}",
            "teacher": {"arch": args.teacher, "layers": args.layers},
            "student": {"arch": args.student, "layers": args.layers},
            "dataset": {
                "name": "procedural_shapes",
                "args": {"num_samples": 4 * args.batch_size, "image_size": args.image_size},
            },
            "stage1": {"iterations": 1},
            "stage2": {"iterations": args.warmup + args.steps},
            "batch_size": args.batch_size,
            "device": "cuda" if args.gpus else "cpu",
            "mixed_precision": args.mixed_precision,
            "max_eval_batches": 1,
            "checkpoint_every": 10**6,
            "resources": resources,
        }
    )


def measure(args: argparse.Namespace, count: int) -> tuple[float, int]:
    """Stage-2 steps per second at ``count`` processes, and rank 0's peak memory in bytes."""
    clock = Stage2Clock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as workdir:
        run_in_processes(run_job, job_spec(args, count), Path(workdir), clock)
    intervals = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    return 1.0 / statistics.median(intervals[args.warmup - 1 :]), clock.peak_bytes


def counts(args: argparse.Namespace) -> list[int]:
    if not args.gpus:
        return list(args.processes)
    available = torch.cuda.device_count()
    if args.gpus == ["all"]:
        return [n for n in (1, 2, 4, 8) if n <= available]
    return [int(n) for n in args.gpus if int(n) <= available]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpus", nargs="+", help="GPU counts, or 'all' (1, 2, 4, 8 present)")
    parser.add_argument("--teacher", default="seg_tiny_teacher")
    parser.add_argument("--student", default="seg_tiny_student")
    parser.add_argument("--layers", nargs="+", default=["backbone", "head"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch")
    parser.add_argument("--steps", type=int, default=20, help="timed stage-2 steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--s1-ratio", action="store_true", help="then run bench/stage2_overhead.py with AMP"
    )
    args = parser.parse_args()
    sizes = counts(args)
    if not sizes:
        raise SystemExit("no process counts to measure (no GPU for --gpus?)")
    kind = "GPUs (NCCL)" if args.gpus else "CPU processes (gloo)"
    print(
        f"{args.teacher} → {args.student}, global batch {args.batch_size} at "
        f"{args.image_size}px, {args.steps} timed stage-2 steps, {kind}, "
        f"mixed precision {args.mixed_precision}"
    )
    base: float | None = None
    for count in sizes:
        rate, peak = measure(args, count)
        base = rate if base is None else base
        line = (
            f"{count} × {kind.split()[0]}: {rate:.2f} steps/s, "
            f"{rate * args.batch_size:.1f} images/s, speed-up {rate / base:.2f}, "
            f"scaling efficiency {rate / base / (count / sizes[0]):.2f}"
        )
        if peak:
            line += f", peak memory rank 0 {peak / 2**30:.2f} GiB"
        print(line, flush=True)
    if args.s1_ratio:
        overhead(args)


def overhead(args: argparse.Namespace) -> None:
    """The S1 ratio on one device with the same mixed precision (bench/stage2_overhead.py)."""
    command = [
        sys.executable,
        str(Path(__file__).with_name("stage2_overhead.py")),
        "--device",
        "cuda" if args.gpus else "cpu",
        "--mixed-precision",
        args.mixed_precision,
        "--rounds",
        "3",
    ]
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
