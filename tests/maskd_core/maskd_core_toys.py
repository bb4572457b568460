"""Tiny models, a toy segmentation task and step-indexed toy data for the core's unit tests.

Imported by the tests as a plain module (``tests/maskd_core`` is on ``sys.path`` under pytest's
default import mode); its name is unique so it cannot shadow another package's helpers.

They stand in for the registered models and datasets so the stages can be tested on their own,
fast and on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskd_core.callbacks import Callback, Stage
from maskd_core.errors import SpecError
from maskd_core.plan import JobPlan, LevelPlan
from maskd_core.spec import JobSpec
from maskd_core.stages import TrainContext
from maskd_core.taps import Taps
from maskd_core.tasks import Task
from maskd_core.validate import validate_job

NUM_CLASSES = 3
IMAGE = 16


class ToySegTask(Task):
    """Segmentation with (images, masks) batches and pixel accuracy as its metric."""

    name = "toy"
    primary_metric = "pixel_acc"

    def collate(self, samples: Sequence[Any]) -> Any:
        images, masks = zip(*samples, strict=True)
        return torch.stack(images), torch.stack(masks)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return batch[0].to(device), batch[1].to(device)

    def batch_size(self, batch: Any) -> int:
        return int(batch[0].shape[0])

    def _logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        out = model(images)
        return F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def training_loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(self._logits(model, batch[0]), batch[1])
        return loss, {"ce": loss.item()}

    def forward(self, model: nn.Module, batch: Any) -> None:
        model(batch[0])

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device
    ) -> dict[str, float]:
        correct = total = 0
        for images, masks in batches:
            pred = self._logits(model, images.to(device)).argmax(1)
            correct += int((pred == masks.to(device)).sum())
            total += masks.numel()
        return {"pixel_acc": correct / total}

    def example_input(self, batch: Any) -> torch.Tensor:
        return batch[0]


class ToyNet(nn.Module):
    """conv-BN-ReLU stem, a stride-2 body, dropout and a 1x1 classifier ("head")."""

    def __init__(self, width: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(width, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(self.stem(x))))


class Pyramid(nn.Module):
    """Returns two levels (stride 1 and 2) as a tuple, or as a dict when ``as_dict``."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> Any:
        levels = (x, self.pool(x))
        return {"p1": levels[0], "p2": levels[1]} if self.as_dict else levels


class ToyFPNNet(nn.Module):
    """A stem, a two-level "neck" returning a tuple or dict, and a head summing both levels."""

    def __init__(self, width: int, as_dict: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.neck = Pyramid(as_dict)
        self.head = nn.Conv2d(width, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.neck(self.stem(x))
        fine, coarse = out.values() if isinstance(out, dict) else out
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")
        return self.head(fine + coarse)


def toy_sample(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose label at each pixel is the channel with the largest value."""
    image = torch.rand(3, IMAGE, IMAGE, generator=generator)
    return image, image.argmax(0)


def toy_batch(seed: int, step: int, size: int = 2) -> Any:
    generator = torch.Generator().manual_seed(seed * 100_003 + step)
    return ToySegTask().collate([toy_sample(generator) for _ in range(size)])


def toy_spec(**overrides: Any) -> JobSpec:
    spec: dict[str, Any] = {
        "teacher": {"arch": "toy", "layers": ["body"]},
        "student": {"arch": "toy", "layers": ["body"]},
        "stage1": {"tokens": 3, "iterations": 4, "optimizer": {"name": "adam", "lr": 0.01}},
        "stage2": {"iterations": 4, "optimizer": {"lr": 0.05}},
        "device": "cpu",
        "batch_size": 2,
        "checkpoint_every": 2,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return JobSpec.model_validate(spec)


def toy_context(spec: JobSpec, callbacks: Any = None) -> TrainContext:
    def train_batches(start: int) -> Iterator[Any]:
        step = start
        while True:
            yield toy_batch(spec.seed, step, spec.batch_size)
            step += 1

    def val_batches() -> Iterable[Any]:
        return [toy_batch(10_000 + spec.seed, i, 2) for i in range(2)]

    kwargs = {} if callbacks is None else {"callbacks": callbacks}
    return TrainContext(
        spec=spec,
        task=ToySegTask(),
        train_batches=train_batches,
        val_batches=val_batches,
        device=torch.device("cpu"),
        **kwargs,
    )


def toy_plan(teacher: nn.Module, student: nn.Module, spec: JobSpec) -> JobPlan:
    """The plan validation would make, from one eval forward through both models' taps."""
    batch = toy_batch(0, 0, 1)
    shapes = []
    for model, layers in ((teacher, spec.teacher.layers), (student, spec.student.layers)):
        model.eval()
        with Taps(model, layers) as taps, torch.no_grad():
            model(batch[0])
            shapes.append(
                [[tuple(lv.shape[1:]) for lv in taps.layer_levels(i)] for i in range(len(layers))]
            )
    levels = [
        LevelPlan(pair, spec.teacher.layers[pair], spec.student.layers[pair], j, t, s)  # type: ignore[arg-type]
        for pair, (t_levels, s_levels) in enumerate(zip(*shapes, strict=True))
        for j, (t, s) in enumerate(zip(t_levels, s_levels, strict=True))
    ]
    return JobPlan(num_classes=NUM_CLASSES, levels=levels)


# ------------------------------------------------------------------ shared test helpers


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def assert_changed(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(v, before[k]) for k, v in module.named_parameters()), "no update"


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.steps: list[tuple[str, int, dict[str, float]]] = []
        self.events: list[str] = []
        self.specs: list[JobSpec] = []
        """The spec each stage started with, in order."""
        self.reasons: list[str] = []
        """Why each failed comparison run failed, in order."""
        self.stop_at = stop_at

    def on_stage_start(
        self, stage: Stage, start_step: int, total_steps: int, spec: JobSpec
    ) -> None:
        self.events.append(f"start {stage} {start_step}/{total_steps}")
        self.specs.append(spec)

    def on_step(self, stage: Stage, step: int, metrics: object) -> None:
        self.steps.append((str(stage), step, dict(metrics)))  # type: ignore[call-overload]

    def on_checkpoint(self, stage: Stage, step: int, path: Path) -> None:
        self.events.append(f"checkpoint {stage} {step}")

    def on_eval(self, stage: Stage, step: int, metrics: object) -> None:
        self.events.append(f"eval {stage} {step}")

    def on_stage_end(self, stage: Stage, step: int, metrics: object) -> None:
        self.events.append(f"end {stage} {step}")

    def on_run_failed(self, stage: Stage, reason: str) -> None:
        self.events.append(f"failed {stage}")
        self.reasons.append(reason)

    def should_stop(self) -> bool:
        return self.stop_at is not None and len(self.steps) >= self.stop_at


def seg_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone", "head"]},
        "student": {"arch": "seg_tiny_student", "layers": ["backbone", "head"]},
        "dataset": {"name": "procedural_shapes", "args": {"num_samples": 4, "image_size": 32}},
        "stage1": {"iterations": 2},
        "stage2": {"iterations": 2},
        "device": "cpu",
    }
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return spec


def refused(spec: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as err:
        validate_job(JobSpec.model_validate(spec))
    return err.value
