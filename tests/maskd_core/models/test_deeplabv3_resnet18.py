"""``deeplabv3_resnet18``: the paper's Cityscapes student, from torchvision parts, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from maskd_core.errors import SpecError
from maskd_core.models import MODELS
from maskd_core.models.segmentation import AUX_CLASSIFIER


def build(**args: object) -> nn.Module:
    name = "deeplabv3_resnet18"
    return MODELS.get(name)(MODELS.parse_args(name, args), 19)


def tapped(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _module, _inputs, output, name=name: outputs.__setitem__(name, output)
        )
        for name in names
    ]
    with torch.no_grad():
        result = model(images)
    for handle in handles:
        handle.remove()
    return {**outputs, **{f"output.{key}": value for key, value in result.items()}}


def test_logits_of_the_input_size_with_19_classes_and_stride_8_taps() -> None:
    model = build(aux_loss=True).eval()
    names = ["backbone.layer3", "backbone.layer4", "classifier", AUX_CLASSIFIER]
    outputs = tapped(model, names, torch.randn(1, 3, 64, 96))
    assert outputs["output.out"].shape == (1, 19, 64, 96)
    assert outputs["output.aux"].shape == (1, 19, 64, 96)
    assert outputs["backbone.layer3"].shape == (1, 256, 8, 12)
    assert outputs["backbone.layer4"].shape == (1, 512, 8, 12)
    assert outputs["classifier"].shape == (1, 19, 8, 12)
    assert outputs[AUX_CLASSIFIER].shape == (1, 19, 8, 12)


def test_without_aux_loss_there_is_no_aux_head() -> None:
    model = build().eval()
    assert AUX_CLASSIFIER not in dict(model.named_modules())
    with torch.no_grad():
        assert set(model(torch.randn(1, 3, 32, 32))) == {"out"}


def test_the_dilated_stages_keep_resnet18s_weights(tmp_path: Path) -> None:
    """Dilation changes strides and paddings only: an ImageNet resnet18 state dict loads whole."""
    classifier = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    model = build(backbone_weights=str(path))
    backbone = model.get_submodule("backbone")
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, classifier.state_dict()[name]), name


def test_backbone_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(SpecError, match="not torchvision's resnet18") as err:
        build(backbone_weights=str(path))
    assert err.value.field == "args.backbone_weights"
