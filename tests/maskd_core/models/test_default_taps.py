"""Every registered model's default taps exist, give the levels they declare, at the strides
they declare: what zero-config pairing (``ModelSpec.layers`` left out) relies on."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from maskd_core.models import MODELS
from maskd_core.registry import DefaultTaps
from maskd_core.taps import Taps

HEIGHT, WIDTH = 64, 96
"""Not square, so a stride applied to the wrong axis shows."""

DETECTOR_ARGS: dict[str, Any] = {"min_size": HEIGHT, "max_size": WIDTH, "fpn_channels": 64}
"""A detector resizes a 64x96 image to itself (and pads it to 64x96, multiples of 32)."""

SEGMENTATION = [
    entry.name for entry in MODELS if entry.family is None and not entry.name.startswith("test_")
]
DETECTION = [entry.name for entry in MODELS if entry.family is not None]


def _tapped_sizes(
    model: torch.nn.Module, taps: DefaultTaps, run: Any
) -> list[list[tuple[int, int]]]:
    model.eval()
    with Taps(model, list(taps.layers), field="layers") as tapped, torch.no_grad():
        run()
        return [
            [(level.shape[-2], level.shape[-1]) for level in tapped.layer_levels(index)]
            for index in range(len(taps.layers))
        ]


def _expected(taps: DefaultTaps) -> list[list[tuple[int, int]]]:
    return [
        [(math.ceil(HEIGHT / stride), math.ceil(WIDTH / stride)) for stride in strides]
        for strides in taps.strides
    ]


def test_every_registered_model_declares_default_taps() -> None:
    shipped = [entry for entry in MODELS if not entry.name.startswith("test_")]  # tests' toys
    assert [entry.name for entry in shipped if entry.taps is None] == []


@pytest.mark.parametrize("arch", SEGMENTATION)
def test_segmentation_default_taps_give_their_strides(arch: str) -> None:
    taps = MODELS.entry(arch).taps
    assert taps is not None and taps.layers
    args = MODELS.parse_args(arch, {})
    torch.manual_seed(0)
    model = MODELS.get(arch)(args, 3)
    images = torch.randn(1, 3, HEIGHT, WIDTH)
    assert _tapped_sizes(model, taps, lambda: model(images)) == _expected(taps)


@pytest.mark.parametrize("arch", SEGMENTATION)
def test_a_declared_aux_head_exists_when_built_with_one(arch: str) -> None:
    taps = MODELS.entry(arch).taps
    assert taps is not None
    if taps.aux is None:
        pytest.skip(f"{arch} has no auxiliary head")
    model = MODELS.get(arch)(MODELS.parse_args(arch, {"aux_loss": True}), 3)
    assert taps.aux in dict(model.named_modules())


@pytest.mark.parametrize("backbone", ["tiny", "mobilenet_v3_large"])
@pytest.mark.parametrize("arch", DETECTION)
def test_detector_default_taps_give_their_strides(arch: str, backbone: str) -> None:
    taps = MODELS.entry(arch).taps
    assert taps is not None
    model = MODELS.get(arch)(MODELS.parse_args(arch, {**DETECTOR_ARGS, "backbone": backbone}), 3)
    images = [torch.rand(3, HEIGHT, WIDTH)]
    assert _tapped_sizes(model, taps, lambda: model(images)) == _expected(taps)


def test_strides_are_looked_up_by_layer_and_level() -> None:
    taps = DefaultTaps(("backbone",), ((8, 16),))
    assert taps.stride_of("backbone", 1) == 16
    assert taps.stride_of("backbone", 2) is None
    assert taps.stride_of("head", 0) is None
    with pytest.raises(ValueError, match="one tuple of level strides per layer"):
        DefaultTaps(("a", "b"), ((8,),))
