"""Stage-2 step time ÷ (teacher no-grad forward + student training step), target ≤ 1.05.

The denominator is the least any feature distillation must do each step: a teacher forward
without gradients and an ordinary student training step. The numerator is ``run_stage2``'s real
loop (taps, aligns, masks, token weights, custom masks, the MasKD loss, LR setting, metrics,
callbacks) on the same pre-made batches, so data loading is left out of both. Rounds of the two
alternate and the medians of per-step times are compared, which keeps a shared machine's load
drift out of the ratio. Three settings are measured: the official segmentation variant (logits
only, no weighting branch, no custom mask), two levels with 1x1 aligns and custom masks, and
the same with the weighting branch (detection-style), which adds a C→C 3x3 convolution on every
teacher level: method compute, large next to these tiny models, small next to an FPN detector.

    .venv/bin/python bench/stage2_overhead.py [--rounds 5 --steps 20 --device cpu]
    .venv/bin/python bench/stage2_overhead.py --device cuda --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from maskd_core.callbacks import Callback
from maskd_core.data import DATASETS
from maskd_core.models import MODELS
from maskd_core.optim import build_optimizer
from maskd_core.spec import JobSpec
from maskd_core.stages import TrainContext, run_stage2
from maskd_core.tasks import TASKS
from maskd_core.tokens import TokenSet
from maskd_core.validate import validate_job

SETTINGS = {
    "segmentation (head logits, 8 tokens)": {
        "layers": ["head"],
        "mask_weighting": False,
        "custom_mask": False,
    },
    "backbone+head, 1x1 aligns, custom masks": {
        "layers": ["backbone", "head"],
        "mask_weighting": False,
        "custom_mask": True,
    },
    "detection-style (backbone+head, 1x1 aligns, custom masks, weighting)": {
        "layers": ["backbone", "head"],
        "mask_weighting": True,
        "custom_mask": True,
    },
}


class StepClock(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        self.times.append(time.perf_counter())


def measure(args: argparse.Namespace, setting: Mapping[str, Any]) -> tuple[float, float]:
    """Median seconds per step of run_stage2 and of the reference, alternating rounds."""
    device = torch.device(args.device)
    spec = JobSpec.model_validate(
        {
            "teacher": {"arch": "seg_tiny_teacher", "layers": setting["layers"]},
            "student": {"arch": "seg_tiny_student", "layers": setting["layers"]},
            "dataset": {"args": {"num_samples": 64, "image_size": args.image_size}},
            "stage1": {"iterations": 1, "mask_weighting": setting["mask_weighting"]},
            "stage2": {
                "iterations": args.steps + 1,
                "custom_mask": setting["custom_mask"],
                "custom_mask_warmup": 0,
            },
            "device": args.device,
            "batch_size": args.batch_size,
            "mixed_precision": args.mixed_precision,
        }
    )
    plan = validate_job(spec)
    task = TASKS.get("segmentation")()
    dataset_args = DATASETS.parse_args("procedural_shapes", spec.dataset.args)
    dataset = DATASETS.get("procedural_shapes")(dataset_args, 0)
    size = args.batch_size
    batches = [
        task.to_device(
            task.collate([dataset[(i * size + j) % len(dataset)] for j in range(size)]), device
        )
        for i in range(4)
    ]

    def build(name: str) -> nn.Module:
        return MODELS.get(name)(MODELS.parse_args(name, {}), plan.num_classes).to(device)

    teacher = build("seg_tiny_teacher").eval().requires_grad_(False)
    tokens = TokenSet([lv.teacher_channels for lv in plan.levels], 8, setting["mask_weighting"])

    def cycle(start: int) -> Iterator[Any]:
        return itertools.cycle(batches)

    def autocast() -> AbstractContextManager[object]:
        """The reference step under the same autocast as ``run_stage2``'s."""
        if args.mixed_precision == "no":
            return nullcontext()
        dtype = torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(device.type, dtype=dtype)

    def maskd_steps() -> list[float]:
        clock = StepClock()
        ctx = TrainContext(spec, task, cycle, lambda: batches[:1], device, clock)
        run_stage2(ctx, teacher, build("seg_tiny_student"), tokens, plan, None)
        return [b - a for a, b in itertools.pairwise(clock.times)]  # first step is warm-up

    def reference_steps() -> list[float]:
        student = build("seg_tiny_student").train()
        optimizer = build_optimizer(student.parameters(), spec.stage2.optimizer)
        fp16 = args.mixed_precision == "fp16"
        scaler = torch.amp.GradScaler("cuda") if fp16 else None
        times = []
        for batch in itertools.islice(itertools.cycle(batches), args.steps + 1):
            with autocast():
                with torch.no_grad():
                    task.forward(teacher, batch)
                loss, _ = task.training_loss(student, batch)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            loss.item()  # the one synchronisation a loop needs to report its loss
            times.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(times)]

    ours: list[float] = []
    reference: list[float] = []
    for _ in range(args.rounds):
        ours += maskd_steps()
        reference += reference_steps()
    return statistics.median(ours), statistics.median(reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="CUDA only"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"seg_tiny_teacher → seg_tiny_student, batch {args.batch_size} at {args.image_size}px, "
        f"{args.device}, mixed precision {args.mixed_precision}, "
        f"{args.rounds}×{args.steps} steps of each"
    )
    for name, setting in SETTINGS.items():
        ours, reference = measure(args, setting)
        print(
            f"{name}: stage-2 step {1000 * ours:.1f} ms, teacher no-grad forward + student "
            f"step {1000 * reference:.1f} ms, ratio {ours / reference:.3f} (target <= 1.05)"
        )


if __name__ == "__main__":
    main()
