"""Ignore regions in the detectors' training loss, against dense references: torchvision's own
loss on the same outputs with the crowd-covered anchors deleted by hand.

One 48x48 image (resized to 64, so the regions must be resized with it) holds one real object and
one crowd region apart from it, so no anchor on the crowd is a positive and deleting the covered
anchors is exactly what leaving them out of the loss must equal.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.rpn import concat_box_prediction_layers

from maskd_core.models import MODELS
from maskd_core.models.detection import DetectorArgs, backbone_with_fpn
from maskd_core.models.detection_ignore import (
    IGNORE_BOXES,
    honour_ignore_regions,
    honours_ignore_regions,
    with_ignore_regions,
)

FAMILIES = ("retinanet", "fcos", "fasterrcnn")
OUTPUTS = 3  # two classes and the background
SIZE = 48
SCALE = 64 / SIZE  # the detectors resize the short side to 64
REAL = torch.tensor([[2.0, 2.0, 20.0, 20.0]])
CROWD = torch.tensor([[29.0, 25.0, 46.0, 46.0]])
EVERY_SAMPLE = 10**6
"""A sampler batch larger than the anchors and proposals, so Faster R-CNN's samplers draw every
candidate and its losses are deterministic."""


def torchvision_detector(family: str) -> nn.Module:
    """torchvision's own detector, tiny, in train mode. The one-stage classifiers start at the
    prior 0.5 rather than 0.01, so every background anchor weighs visibly in the loss."""
    torch.manual_seed(0)
    args = DetectorArgs(backbone="tiny", fpn_channels=64, min_size=64, max_size=64)
    sizes = {"min_size": 64, "max_size": 64}
    model: Any
    if family == "retinanet":
        model = RetinaNet(backbone_with_fpn(args, "p3-p7"), OUTPUTS, **sizes)
    elif family == "fcos":
        model = FCOS(backbone_with_fpn(args, "p3-p7"), OUTPUTS, **sizes)
    else:
        model = FasterRCNN(
            backbone_with_fpn(args, "p2-p6"),
            OUTPUTS,
            rpn_batch_size_per_image=EVERY_SAMPLE,
            box_batch_size_per_image=EVERY_SAMPLE,
            **sizes,
        )
    if family != "fasterrcnn":
        nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    return model.train()


def plain_and_honoured(family: str) -> tuple[Any, Any]:
    plain = torchvision_detector(family)
    return plain, honour_ignore_regions(copy.deepcopy(plain))


def image() -> list[torch.Tensor]:
    return [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))]


def targets(real: torch.Tensor = REAL) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": real, "labels": torch.ones(len(real), dtype=torch.int64)}]


def losses(model: nn.Module, given: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # Faster R-CNN's samplers draw at random (all of them, here)
    result = model(image(), given)
    return {name: value.detach() for name, value in result.items()}


def covered(anchors: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Anchors with at least half of their area inside ``region``, from the definition."""
    width = torch.minimum(anchors[:, 2], region[2]) - torch.maximum(anchors[:, 0], region[0])
    height = torch.minimum(anchors[:, 3], region[3]) - torch.maximum(anchors[:, 1], region[1])
    inside = width.clamp(min=0) * height.clamp(min=0)
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    return inside / area >= 0.5


def centre_inside(anchors: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    x = (anchors[:, 0] + anchors[:, 2]) / 2
    y = (anchors[:, 1] + anchors[:, 3]) / 2
    return (x > region[0]) & (x < region[2]) & (y > region[1]) & (y < region[3])


def one_stage_reference(plain: Any, family: str) -> dict[str, torch.Tensor]:
    """torchvision's loss on the plain model's outputs without the anchors the crowd covers."""
    transformed, resized = plain.transform(image(), targets())
    features = list(plain.backbone(transformed.tensors).values())
    outputs = plain.head(features)
    anchors = plain.anchor_generator(transformed, features)[0]
    crowd = CROWD[0] * SCALE
    deleted = centre_inside(anchors, crowd) if family == "fcos" else covered(anchors, crowd)
    assert 0 < int(deleted.sum()) < len(anchors)
    kept = ~deleted
    outputs = {name: value[:, kept] for name, value in outputs.items()}
    if family == "retinanet":
        reference: dict[str, torch.Tensor] = plain.compute_loss(resized, outputs, [anchors[kept]])
        return reference
    per_level = [x.shape[-2] * x.shape[-1] for x in features]
    kept_per_level = [int(part.sum()) for part in kept.split(per_level)]
    assert kept_per_level[0] and kept_per_level[-1], "FCOS bounds its first and last levels"
    reference = plain.compute_loss(resized, outputs, [anchors[kept]], kept_per_level)
    return reference


def faster_rcnn_reference(plain: Any) -> dict[str, torch.Tensor]:
    """torchvision's RPN loss without the crowd-covered anchors and its RoI-head loss without
    the crowd-covered proposals, on the plain model's outputs."""
    transformed, resized = plain.transform(image(), targets())
    features = plain.backbone(transformed.tensors)
    crowd = CROWD[0] * SCALE
    rpn = plain.rpn
    levels = list(features.values())
    objectness, deltas = concat_box_prediction_layers(*rpn.head(levels))
    anchors = rpn.anchor_generator(transformed, levels)[0]
    kept = ~covered(anchors, crowd)
    labels, matched = rpn.assign_targets_to_anchors([anchors[kept]], resized)
    regression = rpn.box_coder.encode(matched, [anchors[kept]])
    objectness_loss, rpn_box_loss = rpn.compute_loss(
        objectness[kept], deltas[kept], labels, regression
    )
    proposals, _ = rpn(transformed, features, resized)
    kept_proposals = ~covered(proposals[0], crowd)
    assert 0 < int(kept_proposals.sum()) < len(proposals[0])
    _, roi_losses = plain.roi_heads(
        features, [proposals[0][kept_proposals]], transformed.image_sizes, resized
    )
    return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": rpn_box_loss, **roi_losses}


@pytest.mark.parametrize("family", FAMILIES)
def test_without_ignore_regions_the_loss_is_torchvisions_own(family: str) -> None:
    plain, honoured = plain_and_honoured(family)
    expected = losses(plain, targets())
    for given in (targets(), with_ignore_regions(targets(), [torch.zeros((0, 4))])):
        found = losses(honoured, given)
        assert found.keys() == expected.keys()
        assert all(torch.equal(found[name], expected[name]) for name in expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_crowd_is_left_out_as_if_its_anchors_were_deleted(family: str) -> None:
    plain, honoured = plain_and_honoured(family)
    without = losses(plain, targets())
    found = losses(honoured, with_ignore_regions(targets(), [CROWD]))
    reference = (
        faster_rcnn_reference(plain)
        if family == "fasterrcnn"
        else one_stage_reference(plain, family)
    )
    assert found.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(found[name], reference[name], msg=name)
    classification = "loss_classifier" if family == "fasterrcnn" else "classification"
    assert float(found[classification]) != pytest.approx(float(without[classification]))
    if family == "fasterrcnn":
        assert float(found["loss_objectness"]) != pytest.approx(float(without["loss_objectness"]))


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_anchors_matched_to_an_object_inside_a_crowd_stay_positives(family: str) -> None:
    """Two anchors on the crowd matched to the object by hand: they still learn it, and only
    the unmatched ones on the crowd are left out."""
    plain, honoured = plain_and_honoured(family)
    transformed, resized = plain.transform(image(), targets())
    features = list(plain.backbone(transformed.tensors).values())
    outputs = plain.head(features)
    anchors = plain.anchor_generator(transformed, features)[0]
    crowd = CROWD[0] * SCALE
    on_crowd = centre_inside(anchors, crowd) if family == "fcos" else covered(anchors, crowd)
    matched = torch.full((len(anchors),), -1)
    matched[on_crowd.nonzero()[:2, 0]] = 0
    found = honoured.head.compute_loss(
        with_ignore_regions(resized, [crowd[None]]), outputs, [anchors], [matched]
    )
    kept = ~on_crowd | (matched == 0)
    reference = plain.head.compute_loss(
        resized,
        {name: value[:, kept] for name, value in outputs.items()},
        [anchors[kept]],
        [matched[kept]],
    )
    for name in reference:
        torch.testing.assert_close(found[name], reference[name], msg=name)


def test_faster_rcnn_keeps_its_positives_inside_a_crowd() -> None:
    plain, honoured = plain_and_honoured("fasterrcnn")
    around = torch.tensor([[0.0, 0.0, 24.0, 24.0]]) * SCALE
    transformed, resized = plain.transform(image(), targets())
    features = plain.backbone(transformed.tensors)
    anchors = plain.rpn.anchor_generator(transformed, list(features.values()))
    labels, _ = plain.rpn.assign_targets_to_anchors(anchors, resized)
    honoured_labels, _ = honoured.rpn.assign_targets_to_anchors(
        anchors, with_ignore_regions(resized, [around])
    )
    assert torch.equal(labels[0] == 1, honoured_labels[0] == 1)
    assert int((honoured_labels[0] == 0).sum()) < int((labels[0] == 0).sum())
    proposals, _ = plain.rpn(transformed, features, resized)
    sampled = plain.roi_heads.select_training_samples(proposals, resized)[2][0]
    honoured_sampled = honoured.roi_heads.select_training_samples(
        proposals, with_ignore_regions(resized, [around])
    )[2][0]
    assert int((honoured_sampled > 0).sum()) == int((sampled > 0).sum()) > 0
    assert int((honoured_sampled == 0).sum()) < int((sampled == 0).sum())


def test_the_transform_resizes_ignore_regions_with_the_boxes() -> None:
    _, honoured = plain_and_honoured("retinanet")
    given = [{**targets()[0], IGNORE_BOXES: REAL.clone()}]
    images = [torch.rand(3, 40, 40)]  # resized to 64x64
    _, resized = honoured.transform(images, given)
    assert torch.equal(resized[0][IGNORE_BOXES], resized[0]["boxes"])
    assert torch.allclose(resized[0]["boxes"], REAL * 1.6)
    assert torch.equal(given[0][IGNORE_BOXES], REAL), "the caller's targets are not changed"


@pytest.mark.parametrize("family", FAMILIES)
def test_registered_detectors_honour_ignore_regions_and_keep_torchvisions_state_dict(
    family: str,
) -> None:
    args = {"backbone": "tiny", "min_size": 64, "max_size": 64, "fpn_channels": 64}
    model = MODELS.get(family)(MODELS.parse_args(family, args), 2)
    assert honours_ignore_regions(model)
    assert model.state_dict().keys() == torchvision_detector(family).state_dict().keys()
    assert honour_ignore_regions(model) is model, "honouring twice changes nothing"


def test_other_models_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="Linear"):
        honour_ignore_regions(nn.Linear(2, 2))
    assert not honours_ignore_regions(torchvision_detector("retinanet"))
