"""Every registered segmentation model builds offline and gives logits of the input's size."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from maskd_core.errors import SpecError
from maskd_core.models import MODELS
from maskd_core.models.segmentation import DilatedResidualBlock

TORCHVISION_NAMES = [
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
]


def build(name: str, num_classes: int, **args: object) -> nn.Module:
    return MODELS.get(name)(MODELS.parse_args(name, args), num_classes)


def capture(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda _module, _inputs, output, name=name: outputs.__setitem__(name, output)
        )
    with torch.no_grad():
        outputs["model"] = model(images)
    return outputs


@pytest.mark.parametrize(
    ("name", "feature_channels", "parameter_range"),
    [
        ("seg_tiny_teacher", 128, (1_000_000, 2_000_000)),
        ("seg_tiny_student", 64, (100_000, 300_000)),
    ],
)
def test_tiny_models_expose_stride_8_features_and_logits(
    name: str, feature_channels: int, parameter_range: tuple[int, int]
) -> None:
    model = build(name, num_classes=5).eval()
    parameters = sum(p.numel() for p in model.parameters())
    assert parameter_range[0] <= parameters <= parameter_range[1]

    outputs = capture(model, ["backbone", "head"], torch.randn(2, 3, 64, 96))

    assert outputs["backbone"].shape == (2, feature_channels, 8, 12)
    assert outputs["head"].shape == (2, 5, 8, 12)
    assert outputs["model"]["out"].shape == (2, 5, 64, 96)


def test_tiny_model_arguments_change_the_network() -> None:
    model = build("seg_tiny_student", 3, base_channels=8, context_blocks=0, norm="groupnorm")
    outputs = capture(model.eval(), ["backbone"], torch.randn(1, 3, 32, 32))
    assert outputs["backbone"].shape == (1, 32, 4, 4)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize(
    "name", ["seg_tiny_teacher", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"]
)
def test_unknown_arguments_are_refused(name: str) -> None:
    with pytest.raises(SpecError, match="widht"):
        MODELS.parse_args(name, {"widht": 2})


def test_every_torchvision_model_is_registered_with_its_aux_switch() -> None:
    for name in TORCHVISION_NAMES:
        assert name in MODELS
        allowed = set(MODELS.entry(name).args.model_fields)
        assert allowed == (set() if name.startswith("lraspp") else {"aux_loss"})


@pytest.mark.parametrize(
    ("name", "aux_loss"),
    [
        ("deeplabv3_resnet50", True),
        ("fcn_resnet50", False),
        ("deeplabv3_mobilenet_v3_large", True),
        ("lraspp_mobilenet_v3_large", None),
    ],
)
def test_torchvision_models_build_without_downloads_and_predict_input_size(
    name: str, aux_loss: bool | None
) -> None:
    args = {} if aux_loss is None else {"aux_loss": aux_loss}
    model = build(name, num_classes=4, **args).eval()
    outputs = capture(model, ["classifier"], torch.randn(1, 3, 64, 64))["model"]
    assert isinstance(outputs, dict)
    assert outputs["out"].shape == (1, 4, 64, 64)
    assert ("aux" in outputs) == bool(aux_loss)


def test_resnet_classifier_gives_stride_8_logits() -> None:
    model = build("deeplabv3_resnet50", num_classes=4).eval()
    outputs = capture(model, ["backbone.layer4", "classifier"], torch.randn(1, 3, 64, 64))
    assert outputs["backbone.layer4"].shape == (1, 2048, 8, 8)
    assert outputs["classifier"].shape == (1, 4, 8, 8)


def test_context_blocks_start_as_the_identity() -> None:
    block = DilatedResidualBlock(8, dilation=2, norm="batchnorm").eval()
    features = torch.rand(2, 8, 6, 6)
    with torch.no_grad():
        assert torch.equal(block(features), features)
