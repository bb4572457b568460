"""Semantic segmentation: cross-entropy with an ignore index, evaluated by mIoU.

Models may return a logits tensor ``[N, K, h, w]`` or a torchvision-style dict with ``"out"``
and optionally ``"aux"``; logits are upsampled bilinearly to the mask size, as in the official
MasKD segmentation trainer, and the auxiliary loss is weighted 0.4 as there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from maskd_core.data.transforms import IGNORE_INDEX
from maskd_core.errors import DataError
from maskd_core.tasks import TASKS
from maskd_core.tasks.base import Task

SegmentationBatch = tuple[torch.Tensor, torch.Tensor]
AUX_LOSS_WEIGHT = 0.4


def _logits_by_head(output: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return {"out": output}
    if "out" not in output:
        raise TypeError(
            f"a segmentation model must return a logits tensor or a dict with 'out'; got keys "
            f"{sorted(output)}"
        )
    return {key: output[key] for key in ("out", "aux") if key in output}


def _resize_to(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def masked_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose label is not ``IGNORE_INDEX``.

    A batch whose every pixel is ignored (possible after heavy cropping) gives a zero loss
    connected to the graph instead of the NaN that a plain mean over no pixels would give.
    """
    total = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = (masks != IGNORE_INDEX).sum().clamp(min=1)
    return total / labelled


def confusion_matrix(
    predictions: torch.Tensor, masks: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``[K, K]`` int64 counts, rows the true class and columns the predicted one, over the
    pixels not labelled ``IGNORE_INDEX``."""
    labelled = masks != IGNORE_INDEX
    truth = masks[labelled]
    if truth.numel() and int(truth.max()) >= num_classes:
        raise DataError(
            f"a mask holds class {int(truth.max())} but the model predicts {num_classes} "
            f"classes; set the dataset's num_classes to match (ignored pixels use {IGNORE_INDEX})"
        )
    pairs = truth * num_classes + predictions[labelled]
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU over the classes that occur (in the truth or the predictions), and pixel accuracy.

    Classes with an empty union are left out rather than counted as 0 or 1, so an absent
    class neither drags the mean down nor inflates it.
    """
    confusion = confusion.to(torch.float64)
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    total = confusion.sum()
    if not bool(present.any()):
        return {"miou": 0.0, "pixel_acc": 0.0}
    return {
        "miou": float((true_positive[present] / union[present]).mean()),
        "pixel_acc": float(true_positive.sum() / total),
    }


@TASKS.register("segmentation")
class SegmentationTask(Task):
    """Semantic segmentation with ignore index 255 and an mIoU primary metric."""

    name: ClassVar[str] = "segmentation"
    primary_metric: ClassVar[str] = "miou"

    def collate(self, samples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> SegmentationBatch:
        sizes = {tuple(image.shape[-2:]) for image, _ in samples}
        if len(sizes) > 1:
            raise DataError(
                f"images of one batch differ in size ({', '.join(map(str, sorted(sizes)))}); "
                "set the dataset's image_size so that every sample has the same size"
            )
        images = torch.stack([image for image, _ in samples])
        masks = torch.stack([mask for _, mask in samples])
        return images, masks

    def to_device(self, batch: SegmentationBatch, device: torch.device) -> SegmentationBatch:
        images, masks = batch
        return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)

    def batch_size(self, batch: SegmentationBatch) -> int:
        return int(batch[0].shape[0])

    def training_loss(
        self, model: nn.Module, batch: SegmentationBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        images, masks = batch
        logits = _logits_by_head(model(images))
        task_loss = masked_cross_entropy(_resize_to(logits["out"], masks.shape[-2:]), masks)
        components = {"task_loss": float(task_loss.detach())}
        loss = task_loss
        if "aux" in logits:
            aux_loss = masked_cross_entropy(_resize_to(logits["aux"], masks.shape[-2:]), masks)
            components["aux_loss"] = float(aux_loss.detach())
            loss = loss + AUX_LOSS_WEIGHT * aux_loss
        return loss, components

    def forward(self, model: nn.Module, batch: SegmentationBatch) -> None:
        model(batch[0])

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[SegmentationBatch], device: torch.device
    ) -> dict[str, float]:
        confusion: torch.Tensor | None = None
        for batch in batches:
            images, masks = self.to_device(batch, device)
            logits = _resize_to(_logits_by_head(model(images))["out"], masks.shape[-2:])
            counts = confusion_matrix(logits.argmax(1), masks, logits.shape[1])
            confusion = counts if confusion is None else confusion + counts
        if confusion is None:
            return {"miou": 0.0, "pixel_acc": 0.0}
        return scores_from_confusion(confusion)

    def example_input(self, batch: SegmentationBatch) -> torch.Tensor:
        return batch[0]
