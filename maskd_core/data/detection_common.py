"""What the detection datasets share: the sample type, image reading, box checks and the flip.

A detection sample keeps its own image size: torchvision's detectors resize and pad inside the
model (``GeneralizedRCNNTransform``), so a batch is a list of images and a list of targets rather
than stacked tensors. Images are ``float32 [3, H, W]`` in [0, 1], *not* normalised, because the
detector's transform normalises them itself.

Class ids are ``1..K`` with ``0`` reserved for background, the convention of torchvision's
detectors; ``num_classes`` of a detection dataset is ``K`` and the detection models are built with
``K + 1`` outputs (see ``maskd_core.models.detection``).

Ignore regions (COCO's ``iscrowd`` annotations, VOC's ``difficult`` objects) travel with a sample
beside its objects, through the augmentation and into the batches. They are never training
targets: the training loss leaves the anchors on them out, as neither positives nor negatives
(``maskd_core.models.detection_ignore``), and evaluation treats them as COCO treats crowds: a
detection on one counts neither as a hit nor as a false positive.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from maskd_core.data.base import DenseDataset
from maskd_core.errors import DataError


class DetectionSample(NamedTuple):
    """One image with its objects (a NamedTuple so DataLoader workers can pickle it)."""

    image: torch.Tensor
    """``float32 [3, H, W]`` in [0, 1]."""
    boxes: torch.Tensor
    """``float32 [K, 4]``: ``x1, y1, x2, y2`` in pixels of this image, with ``x2 > x1, y2 > y1``."""
    labels: torch.Tensor
    """``int64 [K]``: class ids in ``1..num_classes``."""
    ignore_boxes: torch.Tensor | None = None
    """``float32 [M, 4]`` ``xyxy`` ignore regions of this image (crowds, difficult objects);
    None when it has none."""
    ignore_labels: torch.Tensor | None = None
    """``int64 [M]``: the class of each ignore region (only detections of that class on it are
    ignored, as in COCO)."""


class DetectionDataset(DenseDataset):
    """Base of the detection datasets: fixes the task and the augmentation.

    The augmentation is a horizontal flip only. Rescaling an image before the detector would be
    undone by the detector's own resize to ``min_size``, and multi-scale training would need the
    teacher and the student to pick the same size per batch so their FPN levels line up; both
    are left out on purpose.
    """

    task: ClassVar[str] = "detection"

    def augment(self, sample: DetectionSample, generator: torch.Generator) -> DetectionSample:
        if float(torch.rand((), generator=generator)) < 0.5:
            return hflip(sample)
        return sample


def hflip(sample: DetectionSample) -> DetectionSample:
    """Mirror the image left-right and its boxes with it (``x -> W - x``)."""
    width = sample.image.shape[-1]
    ignore = None if sample.ignore_boxes is None else _mirror(sample.ignore_boxes, width)
    return DetectionSample(
        sample.image.flip(-1),
        _mirror(sample.boxes, width),
        sample.labels,
        ignore,
        sample.ignore_labels,
    )


def _mirror(boxes: torch.Tensor, width: int) -> torch.Tensor:
    mirrored = boxes.clone()
    mirrored[:, 0] = width - boxes[:, 2]
    mirrored[:, 2] = width - boxes[:, 0]
    return mirrored


def empty_targets() -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes and labels of an image without objects (torchvision accepts ``[0, 4]`` boxes)."""
    return torch.zeros((0, 4), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64)


def load_image(path: Path) -> torch.Tensor:
    """Read an image file as ``float32 [3, H, W]`` in [0, 1] (greyscale and RGBA become RGB)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image file {str(path)!r} does not exist") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image file {str(path)!r}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def clean_box(
    box: tuple[float, float, float, float], width: float, height: float, where: str
) -> tuple[float, float, float, float] | None:
    """Check an ``xyxy`` box, clip it to the image and drop it when nothing of it is left.

    A box whose far corner lies before its near corner (negative width or height) or with a
    non-finite coordinate is a broken annotation, reported as ``DataError`` naming ``where``.
    Boxes of zero area after clipping are dropped silently, as torchvision's COCO reference
    does: the detectors refuse degenerate boxes, and a zero-area box marks no object.
    """
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        raise DataError(f"{where} has a non-finite coordinate in box {list(box)}")
    if x2 < x1:
        raise DataError(f"{where} has box {list(box)} with negative width ({x2 - x1:g})")
    if y2 < y1:
        raise DataError(f"{where} has box {list(box)} with negative height ({y2 - y1:g})")
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def as_targets(
    boxes: list[tuple[float, float, float, float]], labels: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box and label lists as the tensors a ``DetectionSample`` holds."""
    if not boxes:
        return empty_targets()
    return torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)


class Objects:
    """One image's objects and ignore regions, as plain lists until a sample is asked for
    (a dataset of 100k images holds no tensors)."""

    __slots__ = ("boxes", "ignore_boxes", "ignore_labels", "labels")

    def __init__(self) -> None:
        self.boxes: list[tuple[float, float, float, float]] = []
        self.labels: list[int] = []
        self.ignore_boxes: list[tuple[float, float, float, float]] = []
        self.ignore_labels: list[int] = []

    def add(self, box: tuple[float, float, float, float], label: int, *, ignore: bool) -> None:
        """An object to detect, or with ``ignore`` a region evaluation leaves out."""
        if ignore:
            self.ignore_boxes.append(box)
            self.ignore_labels.append(label)
        else:
            self.boxes.append(box)
            self.labels.append(label)

    def sample(self, image: torch.Tensor) -> DetectionSample:
        boxes, labels = as_targets(self.boxes, self.labels)
        if not self.ignore_boxes:
            return DetectionSample(image, boxes, labels)
        ignore_boxes, ignore_labels = as_targets(self.ignore_boxes, self.ignore_labels)
        return DetectionSample(image, boxes, labels, ignore_boxes, ignore_labels)
