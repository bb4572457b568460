"""Dense object detection with torchvision detectors, evaluated by COCO mAP.

A batch is a ``DetectionBatch``: a list of ``float32 [3, H, W]`` images in [0, 1] of any sizes and
a list of targets ``{"boxes": float32 [K, 4] xyxy in pixels, "labels": int64 [K]}``, which is what
torchvision's FCOS, RetinaNet and Faster R-CNN take. The detector itself resizes, normalises and
pads (its ``transform``), so nothing is stacked here. A batch's ignore regions (COCO crowds, VOC
difficult objects) reach the training loss too, beside the targets, so that the anchors on them
are neither positives nor negatives (``maskd_core.models.detection_ignore``).

Stage 2 reads the teacher's FPN levels through taps. ``forward`` runs only the teacher's
``transform`` and ``backbone``, skipping the heads, anchor matching and box decoding whose
outputs nobody reads. The teacher then sees the same resized, padded tensor as the student, as
long as both are built with the same ``min_size``/``max_size`` (the model registry documents
this); if they differ anyway, the stages resize the levels bilinearly, which aligns the maps
but not the padding, so keep the sizes equal.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from maskd_core.data.detection_common import DetectionSample, empty_targets
from maskd_core.models.detection_ignore import honours_ignore_regions, with_ignore_regions
from maskd_core.taps import reads_within
from maskd_core.tasks import TASKS, Task

Target = dict[str, torch.Tensor]

COCO_STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")
"""Names of ``COCOeval.stats[0:6]``: AP at IoU .50:.95, at .50, at .75, and by object area."""

COCO_AREAS = (
    (0.0, 1e10),
    (0.0, 1e10),
    (0.0, 1e10),
    (0.0, 32.0**2),
    (32.0**2, 96.0**2),
    (96.0**2, 1e10),
)
"""Object areas (pixels², bounds included as in ``COCOeval``) each of ``COCO_STATS`` scores."""


class DetectionBatch(NamedTuple):
    images: list[torch.Tensor]
    targets: list[Target]
    """The objects the detector learns to find, never the ignore regions."""
    ignore: list[Target] | None = None
    """Per image, its ignore regions (``boxes``/``labels``): the training loss leaves the
    anchors on them out, evaluation the detections of their class on them; None: none."""


@TASKS.register("detection")
class DetectionTask(Task):
    """Object detection: the model's own loss dict for training, COCO box mAP for evaluation."""

    name: ClassVar[str] = "detection"
    primary_metric: ClassVar[str] = "map"

    def collate(self, samples: Sequence[DetectionSample]) -> DetectionBatch:
        regions = [_ignore_regions(s) for s in samples]
        return DetectionBatch(
            images=[s.image for s in samples],
            targets=[{"boxes": s.boxes, "labels": s.labels} for s in samples],
            ignore=regions if any(len(r["boxes"]) for r in regions) else None,
        )

    def to_device(self, batch: DetectionBatch, device: torch.device) -> DetectionBatch:
        return DetectionBatch(
            images=[image.to(device, non_blocking=True) for image in batch.images],
            targets=[
                {key: value.to(device, non_blocking=True) for key, value in target.items()}
                for target in batch.targets
            ],
            ignore=None
            if batch.ignore is None
            else [
                {key: value.to(device, non_blocking=True) for key, value in regions.items()}
                for regions in batch.ignore
            ],
        )

    def batch_size(self, batch: DetectionBatch) -> int:
        return len(batch.images)

    def training_loss(
        self, model: nn.Module, batch: DetectionBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of the detector's losses (classification, box regression, centerness, RPN...).

        torchvision detectors return losses only in training mode; in eval mode they return
        detections and ignore the targets, so the mode is checked rather than trusted. The
        batch's ignore regions go to the detector with the targets; a detector that would train
        them as background is refused rather than trained wrong.
        """
        if not model.training:
            raise RuntimeError(
                "detection training_loss needs the model in train mode (torchvision detectors "
                "return detections, not losses, in eval mode)"
            )
        targets = batch.targets
        if batch.ignore is not None:
            if not honours_ignore_regions(model):
                raise TypeError(
                    f"this batch has ignore regions, which a {type(model).__name__} would train "
                    "as background; use a model from the detection registry"
                )
            targets = with_ignore_regions(targets, [regions["boxes"] for regions in batch.ignore])
        losses = model(batch.images, targets)
        if not isinstance(losses, dict) or not losses:
            raise TypeError(
                f"a detection model must return a dict of losses in train mode, got "
                f"{type(losses).__name__}; use a model from the detection registry"
            )
        total = torch.stack([value for value in losses.values()]).sum()
        return total, {name: float(value.detach()) for name, value in losses.items()}

    def forward(self, model: nn.Module, batch: DetectionBatch) -> None:
        """The teacher's transform and backbone+FPN, and a one-stage head only when a tap reads
        it (its class logits): all that stage 2's taps read."""
        detector: Any = model  # a torchvision detector: has .transform and .backbone
        transformed, _ = detector.transform(batch.images)
        features = detector.backbone(transformed.tensors)
        head = getattr(detector, "head", None)  # one-stage detectors only
        if head is not None and reads_within(head):
            head(list(features.values()))

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[DetectionBatch], device: torch.device
    ) -> dict[str, float]:
        """COCO box mAP of ``model``'s detections against the batches' targets.

        The ground truth is built in memory from the targets (image ids are positions in the
        evaluation order), so any dataset is scored the way COCO is, with ``pycocotools``.
        Size buckets with no ground-truth object are left out of the result rather than
        reported as COCO's -1 or a misleading 0; ``map`` is 0.0 when there is no object at all.
        """
        ground_truth: list[Target] = []
        ignore: list[Target] = []
        detections: list[dict[str, torch.Tensor]] = []
        image_sizes: list[tuple[int, int]] = []
        for batch in batches:
            on_device = self.to_device(batch, device)
            for output in model(on_device.images):
                found = output["labels"] > 0  # output 0 is background, never a class
                detections.append(
                    {k: output[k][found].cpu() for k in ("boxes", "scores", "labels")}
                )
            ground_truth += batch.targets
            ignore += batch.ignore or [_no_targets() for _ in batch.targets]
            image_sizes += [(int(image.shape[-2]), int(image.shape[-1])) for image in batch.images]
        return coco_map(ground_truth, detections, image_sizes, ignore)

    def example_input(self, batch: DetectionBatch) -> torch.Tensor:
        """The first image as a ``[1, 3, H, W]`` tensor (torchvision detectors accept it)."""
        return batch.images[0].unsqueeze(0)


def _ignore_regions(sample: DetectionSample) -> Target:
    if sample.ignore_boxes is None or sample.ignore_labels is None:
        return _no_targets()
    return {"boxes": sample.ignore_boxes, "labels": sample.ignore_labels}


def _no_targets() -> Target:
    boxes, labels = empty_targets()
    return {"boxes": boxes, "labels": labels}


def coco_map(
    ground_truth: Sequence[Target],
    detections: Sequence[dict[str, torch.Tensor]],
    image_sizes: Sequence[tuple[int, int]],
    ignore: Sequence[Target] | None = None,
) -> dict[str, float]:
    """COCO box AP of ``detections`` (``boxes``/``scores``/``labels`` per image) against
    ``ground_truth`` (``boxes``/``labels`` per image), images of ``(height, width)``.

    Every ground-truth box counts, with its box area as the COCO area, so the
    small/medium/large split is by box size. ``ignore`` (per image, ``boxes``/``labels``) are
    COCO crowd regions: a detection of their class that lies in one counts neither as a hit nor
    as a false positive.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    if ignore is None:
        ignore = [_no_targets() for _ in image_sizes]
    for image_id, (target, crowd, found, (height, width)) in enumerate(
        zip(ground_truth, ignore, detections, image_sizes, strict=True), start=1
    ):
        images.append({"id": image_id, "height": height, "width": width})
        for truth, is_crowd in ((target, 0), (crowd, 1)):
            for box, label in zip(_xywh(truth["boxes"]), truth["labels"].tolist(), strict=True):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": is_crowd,
                    }
                )
        for box, score, label in zip(
            _xywh(found["boxes"]), found["scores"].tolist(), found["labels"].tolist(), strict=True
        ):
            results.append(
                {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
            )
    areas = [a["area"] for a in annotations if not a["iscrowd"]]
    if not areas:  # no object to find: crowds alone score nothing
        return {name: 0.0 for name in COCO_STATS[:3]}
    if not results:  # pycocotools cannot load an empty result list; nothing found scores 0
        return {
            name: 0.0
            for name, (low, high) in zip(COCO_STATS, COCO_AREAS, strict=False)
            if any(low <= area <= high for area in areas)
        }

    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c, "name": str(c)}
            for c in sorted({a["category_id"] for a in annotations + results})
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats[: len(COCO_STATS)], dtype=float)
    return {name: float(value) for name, value in zip(COCO_STATS, stats, strict=True) if value >= 0}


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    """``xyxy`` boxes as COCO's ``[x, y, width, height]`` lists."""
    xyxy = boxes.detach().to(torch.float64).reshape(-1, 4)
    return torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
