"""The registered torchvision detectors: they build, train, detect, and expose FPN levels that
a hook on ``backbone`` can replace for the heads."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from maskd_core.errors import SpecError
from maskd_core.models import MODELS

SMALL = {"min_size": 64, "max_size": 64, "fpn_channels": 32}
NUM_CLASSES = 3


def build(arch: str, **args: Any) -> nn.Module:
    torch.manual_seed(0)
    return MODELS.get(arch)(MODELS.parse_args(arch, {**SMALL, **args}), NUM_CLASSES)


def images_and_targets() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.rand(3, 64, 64, generator=generator),
        torch.rand(3, 48, 56, generator=generator),
    ]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[10.0, 2.0, 20.0, 30.0], [30, 30, 50, 46]]),
            "labels": torch.tensor([3, 2]),
        },
    ]
    return images, targets


LEVELS = {
    "fcos": (["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128]),
    "retinanet": (["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128]),
    "fasterrcnn": (["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64]),
}


@pytest.mark.parametrize(
    ("arch", "backbone"),
    [
        ("fcos", "tiny"),
        ("retinanet", "tiny"),
        ("fasterrcnn", "tiny"),
        ("fcos", "resnet18"),
        ("fasterrcnn", "mobilenet_v3_large"),
    ],
)
def test_models_train_detect_and_tap_five_fpn_levels(arch: str, backbone: str) -> None:
    model = build(arch, backbone=backbone)
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        detections = model(images)
        levels = model.backbone(model.transform(images)[0].tensors)
    assert [d["boxes"].shape[1] for d in detections] == [4, 4]
    keys, strides = LEVELS[arch]
    assert list(levels) == keys
    assert [64 // s if s <= 64 else 1 for s in strides] == [v.shape[-1] for v in levels.values()]
    assert {v.shape[1] for v in levels.values()} == {32}
    # K classes + background: the classifier has NUM_CLASSES + 1 outputs.
    if arch == "fasterrcnn":
        assert model.roi_heads.box_predictor.cls_score.out_features == NUM_CLASSES + 1
    else:
        assert model.head.classification_head.num_classes == NUM_CLASSES + 1


def heads_input(model: nn.Module) -> nn.Module:
    """The module that receives the FPN levels after ``backbone``."""
    return model.rpn if isinstance(model, torchvision.models.detection.FasterRCNN) else model.head


@pytest.mark.parametrize("arch", ["fcos", "retinanet", "fasterrcnn"])
@pytest.mark.parametrize("training", [True, False])
def test_a_hook_on_backbone_replaces_what_the_heads_see(arch: str, training: bool) -> None:
    model = build(arch, backbone="tiny", score_thresh=0.0)  # untrained: keep every detection
    model.train(training)
    images, targets = images_and_targets()
    replaced: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    def replace(module: nn.Module, inputs: Any, output: OrderedDict[str, torch.Tensor]) -> Any:
        new = OrderedDict((k, v * 0.5 + 1.0) for k, v in output.items())
        replaced.extend(new.values())
        return new

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        features = (
            args[1] if isinstance(model, torchvision.models.detection.FasterRCNN) else args[0]
        )
        seen.extend(features.values() if isinstance(features, dict) else features)

    torch.manual_seed(1)
    with torch.no_grad():
        plain = model(images, targets) if training else model(images)
    hooks = [
        model.backbone.register_forward_hook(replace),
        heads_input(model).register_forward_pre_hook(record),
    ]
    torch.manual_seed(1)
    with torch.no_grad():
        hooked = model(images, targets) if training else model(images)
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(replaced) == 5
    assert all(s is r for s, r in zip(seen, replaced, strict=True))
    if training:
        assert any(not torch.equal(plain[k], hooked[k]) for k in plain)
    else:
        assert any(
            p["boxes"].shape != h["boxes"].shape or not torch.equal(p["scores"], h["scores"])
            for p, h in zip(plain, hooked, strict=True)
        )


def test_trainable_backbone_layers_freeze_the_shallow_stages() -> None:
    model = build("retinanet", backbone="resnet18", trainable_backbone_layers=2)
    body = model.backbone.body
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    everything = build("retinanet", backbone="resnet18")
    assert all(p.requires_grad for p in everything.parameters())


def test_backbone_weights_come_from_a_local_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18(weights=None)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    model = build(
        "fcos",
        backbone="resnet18",
        backbone_weights=str(tmp_path / "resnet18.pth"),
        norm="frozen_batchnorm",
    )
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
    assert torch.equal(body.bn1.running_var, imagenet.bn1.running_var)
    assert isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)
    # torchvision's default with pretrained weights: the three deepest stages train.
    assert (
        not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    )
    with pytest.raises(SpecError, match="do not fit the backbone"):
        build("fcos", backbone="resnet50", backbone_weights=str(tmp_path / "resnet18.pth"))
    with pytest.raises(SpecError, match="does not exist"):
        build("fcos", backbone="resnet18", backbone_weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize(
    ("arch", "args", "message"),
    [
        ("fcos", {"fpn_channels": 48}, "multiple of 32"),
        ("retinanet", {"backbone": "resnet50", "tiny_width": 16}, "tiny_width applies"),
        ("fasterrcnn", {"backbone": "tiny", "backbone_weights": "x.pth"}, "no pretrained"),
        ("fcos", {"min_size": 800, "max_size": 600}, "max_size"),
        ("retinanet", {"trainable_backbone_layers": 6}, "has 5 stages"),
        ("retinanet", {"head_convs": 2}, "Extra inputs"),
        ("fcos", {"backbone": "resnet200"}, "backbone"),
    ],
)
def test_bad_arguments_are_spec_errors(arch: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        MODELS.parse_args(arch, args)
