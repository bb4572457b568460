"""Ignore regions honoured by the detectors' training losses: a crowd is not background.

COCO's crowd annotations and VOC's difficult objects travel with a training batch as ignore
regions (``maskd_core.data.detection_common``). Trained as plain background, the anchors over a
crowd of people would learn that the people there are no objects. mmdetection's
``MaxIoUAssigner`` has ``ignore_iof_thr`` for this, and this module gives torchvision's detectors
the same rule: an anchor whose overlap with an ignore region covers at least ``IGNORE_IOF`` of
the anchor's own area takes no part in the classification loss, neither as a positive nor as a
negative, unless the detector's own matching made it a positive of a real object. The rule is
class-agnostic (the whole anchor is left out, as mmdetection leaves it out), where evaluation
leaves out only detections of the region's class.

What each family leaves out, with the value its own loss already skips:

- RetinaNet: the anchor's matched index becomes ``Matcher.BETWEEN_THRESHOLDS`` (-2), which its
  focal loss leaves out.
- FCOS: the locations whose point lies inside a region (FCOS assigns points to boxes, not boxes to
  boxes). Its loss has no ignore value, so those locations' logits are replaced by a constant
  whose focal loss against background is exactly zero and which passes no gradient: the loss is
  the one computed without those locations.
- Faster R-CNN: RPN anchors and RoI-head proposals take the label -1, which the samplers never
  draw, so both sample their negatives elsewhere.

Box regression trains on positives only and is unchanged.

The regions reach the loss inside the targets, under ``IGNORE_BOXES``, in the pixels of the input
image; the detector's transform resizes them with the image as it resizes ``boxes``. A target
without the key trains exactly as torchvision's model does.

torchvision's constructors build the transform, heads, RPN and RoI heads themselves and take no
argument for a subclass of them, so ``honour_ignore_regions`` re-types the built parts. The
subclasses only override methods and hold no state of their own, so the weights, the settings
and the state-dict keys stay those of torchvision's model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

Target = dict[str, Tensor]
Detector = TypeVar("Detector", bound=nn.Module)

IGNORE_BOXES = "ignore_boxes"
"""The target key of an image's ignore regions: ``float32 [M, 4]`` ``xyxy`` boxes in pixels."""

IGNORE_IOF = 0.5
"""Least share of an anchor's area inside an ignore region that leaves the anchor out (IoF,
intersection over the anchor's area), mmdetection's usual ``ignore_iof_thr``."""

_SAMPLER_SKIPS = -1.0
"""The label Faster R-CNN's ``BalancedPositiveNegativeSampler`` never draws: positives are
``>= 1``, negatives ``0``."""

_CERTAIN_BACKGROUND_LOGIT = -1e4
"""A logit whose sigmoid focal loss against a background target is exactly 0 in float32, float16
and bfloat16 (its sigmoid rounds to 0 and its cross-entropy to 0)."""


def with_ignore_regions(targets: Sequence[Target], regions: Sequence[Tensor]) -> list[Target]:
    """``targets`` with each image's ignore regions (``xyxy`` boxes) under ``IGNORE_BOXES``."""
    return [{**target, IGNORE_BOXES: boxes} for target, boxes in zip(targets, regions, strict=True)]


def covered_boxes(boxes: Tensor, regions: Tensor) -> Tensor:
    """Which ``boxes`` (anchors or proposals, ``[A, 4]`` xyxy) have at least ``IGNORE_IOF`` of their
    area inside one of ``regions`` (``[M, 4]``): a bool ``[A]``."""
    top_left = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    # Compared as a product, so a zero-area box could not divide by zero.
    return (overlap >= IGNORE_IOF * area[:, None]).any(dim=1)


def points_inside(points: Tensor, regions: Tensor) -> Tensor:
    """Which ``points`` (``[A, 2]`` xy) lie strictly inside one of ``regions`` (``[M, 4]``), as
    FCOS requires of a location it assigns to a box: a bool ``[A]``."""
    after_near = points[:, None, :] > regions[None, :, :2]
    before_far = points[:, None, :] < regions[None, :, 2:]
    return (after_near & before_far).all(dim=2).any(dim=1)


def _regions(target: Target) -> Tensor | None:
    regions = target.get(IGNORE_BOXES)
    return regions if regions is not None and len(regions) else None


class IgnoreRegionTransform(GeneralizedRCNNTransform):  # type: ignore[misc]  # untyped base
    """torchvision's resize-and-normalise transform that resizes the ignore regions too."""

    def resize(self, image: Tensor, target: Target | None = None) -> tuple[Tensor, Target | None]:
        resized, target = super().resize(image, target)
        if target is not None and IGNORE_BOXES in target:
            target[IGNORE_BOXES] = resize_boxes(
                target[IGNORE_BOXES], list(image.shape[-2:]), list(resized.shape[-2:])
            )
        return resized, target


class IgnoreRegionRetinaNetHead(RetinaNetHead):  # type: ignore[misc]  # untyped base
    """RetinaNet's head, whose classification loss skips unmatched anchors on ignore regions."""

    def compute_loss(
        self,
        targets: list[Target],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        honoured = []
        for target, anchors_in_image, matched in zip(targets, anchors, matched_idxs, strict=True):
            regions = _regions(target)
            if regions is not None:
                left_out = (matched < 0) & covered_boxes(anchors_in_image, regions)
                matched = matched.masked_fill(left_out, Matcher.BETWEEN_THRESHOLDS)
            honoured.append(matched)
        losses: dict[str, Tensor] = super().compute_loss(targets, head_outputs, anchors, honoured)
        return losses


class IgnoreRegionFCOSHead(FCOSHead):  # type: ignore[misc]  # untyped base
    """FCOS's head, whose classification loss skips unmatched locations inside ignore regions."""

    def compute_loss(
        self,
        targets: list[Target],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        left_out = torch.zeros_like(head_outputs["cls_logits"][..., 0], dtype=torch.bool)
        for index, (target, anchors_in_image, matched) in enumerate(
            zip(targets, anchors, matched_idxs, strict=True)
        ):
            regions = _regions(target)
            if regions is not None:
                locations = (anchors_in_image[:, :2] + anchors_in_image[:, 2:]) / 2
                left_out[index] = (matched < 0) & points_inside(locations, regions)
        if left_out.any():
            logits = head_outputs["cls_logits"].masked_fill(
                left_out[..., None], _CERTAIN_BACKGROUND_LOGIT
            )
            head_outputs = {**head_outputs, "cls_logits": logits}
        losses: dict[str, Tensor] = super().compute_loss(
            targets, head_outputs, anchors, matched_idxs
        )
        return losses


class IgnoreRegionRPN(RegionProposalNetwork):  # type: ignore[misc]  # untyped base
    """Faster R-CNN's RPN, which never samples a background anchor on an ignore region."""

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[Target]
    ) -> tuple[list[Tensor], list[Tensor]]:
        labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        honoured = [
            _skip_covered_background(labels_in_image, anchors_in_image, _regions(target))
            for labels_in_image, anchors_in_image, target in zip(
                labels, anchors, targets, strict=True
            )
        ]
        return honoured, matched_gt_boxes


class IgnoreRegionRoIHeads(RoIHeads):  # type: ignore[misc]  # untyped base
    """Faster R-CNN's RoI heads, which never sample a background proposal on an ignore region.

    torchvision hands ``assign_targets_to_proposals`` the boxes and labels but not the targets,
    so ``select_training_samples`` keeps the regions on the module for the one call it makes.
    """

    _ignore_regions: Sequence[Tensor | None] = ()

    def select_training_samples(
        self, proposals: list[Tensor], targets: list[Target] | None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        self._ignore_regions = [_regions(t) for t in targets] if targets is not None else ()
        try:
            samples: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] = (
                super().select_training_samples(proposals, targets)
            )
            return samples
        finally:
            self._ignore_regions = ()

    def assign_targets_to_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        matched_idxs, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        regions = self._ignore_regions or [None] * len(proposals)
        honoured = [
            _skip_covered_background(labels_in_image, proposals_in_image, regions_in_image)
            for labels_in_image, proposals_in_image, regions_in_image in zip(
                labels, proposals, regions, strict=True
            )
        ]
        return matched_idxs, honoured


def _skip_covered_background(labels: Tensor, boxes: Tensor, regions: Tensor | None) -> Tensor:
    """``labels`` (Faster R-CNN's: 0 background, -1 skipped) with the background ``boxes`` that an
    ignore region covers turned to skipped."""
    if regions is None:
        return labels
    covered = (labels == 0) & covered_boxes(boxes, regions)
    return labels.masked_fill(covered, _SAMPLER_SKIPS)


_HONOURING: dict[type[nn.Module], type[nn.Module]] = {
    GeneralizedRCNNTransform: IgnoreRegionTransform,
    RetinaNetHead: IgnoreRegionRetinaNetHead,
    FCOSHead: IgnoreRegionFCOSHead,
    RegionProposalNetwork: IgnoreRegionRPN,
    RoIHeads: IgnoreRegionRoIHeads,
}
"""torchvision's part -> its subclass that honours ignore regions."""


def honour_ignore_regions(model: Detector) -> Detector:
    """Make a torchvision RetinaNet, FCOS or Faster R-CNN leave ignore regions out of its
    training loss (see the module's docstring); returns the same model. Idempotent."""
    detector: Any = model
    parts: list[nn.Module]
    if isinstance(model, RetinaNet | FCOS):
        parts = [detector.transform, detector.head]
    elif isinstance(model, FasterRCNN):
        parts = [detector.transform, detector.rpn, detector.roi_heads]
    else:
        raise TypeError(
            f"ignore regions are honoured by torchvision's RetinaNet, FCOS and Faster R-CNN, "
            f"not by a {type(model).__name__}"
        )
    for part in parts:
        if isinstance(part, tuple(_HONOURING.values())):
            continue
        honouring = _HONOURING.get(type(part))
        if honouring is None:
            raise TypeError(
                f"cannot honour ignore regions in a {type(model).__name__} whose "
                f"{type(part).__name__} is not torchvision's own"
            )
        part.__class__ = honouring
    return model


def honours_ignore_regions(model: nn.Module) -> bool:
    """Whether ``model`` went through ``honour_ignore_regions``."""
    return isinstance(getattr(model, "transform", None), IgnoreRegionTransform)
