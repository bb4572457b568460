"""Segmentation networks by name: two tiny built-ins, the torchvision family and a ResNet-18
DeepLabV3 assembled from torchvision parts (the paper's Cityscapes student).

The built-ins exist so that a whole MasKD job (teacher, stage 1, stage 2) trains in minutes on a
CPU. They follow the layout the official segmentation variant distils: a stride-8 ``backbone``
and a ``head`` whose output is the stride-8 class logits (the tensor receptive tokens act on,
method §1.4/§2.3), upsampled to the input size only in ``forward``. Both return
``{"out": logits}`` like torchvision's segmentation models, so the task treats them alike.

The torchvision models are built with ``weights=None, weights_backbone=None``: nothing is ever
downloaded, and a user who wants pretrained weights passes a local state dict instead. Those with
``aux_loss`` (and ``deeplabv3_resnet18``) have an auxiliary head, ``AUX_CLASSIFIER``, which the
task trains and MasKD's ``aux_weight`` distils.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet18
from torchvision.models import segmentation as tv_segmentation
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from maskd_core.errors import SpecError
from maskd_core.models import MODELS, read_state_dict
from maskd_core.paths import LocalPath
from maskd_core.registry import DefaultTaps

NormName = Literal["batchnorm", "groupnorm"]

AUX_CLASSIFIER = "aux_classifier"
"""The module name of a segmentation model's auxiliary head (torchvision's, and ours): its
output is the ``"aux"`` logits the task trains with weight 0.4, and the tap MasKD's
``aux_weight`` distils."""

LOGITS_AT_STRIDE_8 = DefaultTaps(("head",), ((8,),))
"""The built-ins' default taps: the stride-8 class logits, what the official segmentation
variant distils (a teacher's and a student's always pair, whatever their widths)."""


def classifier_taps(stride: int) -> DefaultTaps:
    """The default taps of a torchvision-style model: the logits of ``classifier`` at
    ``stride``, and the auxiliary head's when it is built with one."""
    return DefaultTaps(("classifier",), ((stride,),), aux=AUX_CLASSIFIER)


def _norm(kind: NormName, channels: int) -> nn.BatchNorm2d | nn.GroupNorm:
    # Group norm keeps statistics meaningful at the batch sizes of 1-2 that large crops force.
    if kind == "groupnorm":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.BatchNorm2d(channels)


def _conv_norm_relu(
    in_channels: int, out_channels: int, norm: NormName, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
        ),
        _norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class DilatedResidualBlock(nn.Module):
    """Two dilated 3×3 convolutions with a skip: context at stride 8 without losing resolution."""

    def __init__(self, channels: int, dilation: int, norm: NormName) -> None:
        super().__init__()
        self.conv1 = _conv_norm_relu(channels, channels, norm, dilation=dilation)
        self.conv2 = nn.Conv2d(
            channels, channels, kernel_size=3, padding=dilation, dilation=dilation, bias=False
        )
        self.norm2 = _norm(norm, channels)
        # Each block starts as the identity, so a deep stack trains as fast as a shallow one
        # (about 0.39 vs 0.33 val mIoU after 1000 SGD steps of the teacher on procedural_shapes).
        nn.init.zeros_(self.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm2(self.conv2(self.conv1(x))))


class TinySegNet(nn.Module):
    """A small output-stride-8 segmentation network.

    Modules users tap (stride 8, i.e. ``H/8 × W/8`` for an ``H × W`` input):

    - ``backbone``: features with ``4 * base_channels`` channels,
    - ``head``: class logits with ``num_classes`` channels (what MasKD's segmentation variant
      distils; teacher and student share its shape, so no adaptation layer is needed).

    The stem downsamples at once (stride 2) because full-resolution convolutions dominate the
    cost on a CPU while adding little at these image sizes.
    """

    def __init__(
        self,
        num_classes: int,
        base_channels: int,
        context_blocks: int,
        norm: NormName,
        dropout: float,
    ) -> None:
        super().__init__()
        c1, c2, c3 = base_channels, 2 * base_channels, 4 * base_channels
        # Alternating dilations widen the context quickly at the small stride-8 maps (8×8 to
        # 16×16 pixels for 64-128 px inputs) without a dilation larger than the map.
        dilations = [(2, 4)[i % 2] for i in range(context_blocks)]
        self.backbone = nn.Sequential(
            _conv_norm_relu(3, c1, norm, stride=2),
            _conv_norm_relu(c1, c1, norm),
            _conv_norm_relu(c1, c2, norm, stride=2),
            _conv_norm_relu(c2, c2, norm),
            _conv_norm_relu(c2, c3, norm, stride=2),
            *(DilatedResidualBlock(c3, d, norm) for d in dilations),
        )
        self.head = nn.Sequential(
            _conv_norm_relu(c3, c2, norm),
            nn.Dropout2d(dropout),
            nn.Conv2d(c2, num_classes, kernel_size=1),
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.backbone(images))
        upsampled = F.interpolate(
            logits, size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        return {"out": upsampled}


class TinySegTeacherArgs(BaseModel):
    """Arguments of ``seg_tiny_teacher`` (about 1.4M parameters at the defaults)."""

    model_config = ConfigDict(extra="forbid")

    base_channels: int = Field(
        default=32, ge=4, le=256, description="Stem width; the stride-8 features have 4×."
    )
    context_blocks: int = Field(
        default=4, ge=0, le=16, description="Dilated residual blocks at stride 8."
    )
    norm: NormName = "batchnorm"
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout before the logits.")


class TinySegStudentArgs(TinySegTeacherArgs):
    """Arguments of ``seg_tiny_student`` (about 0.13M parameters at the defaults)."""

    base_channels: int = Field(
        default=16, ge=4, le=256, description="Stem width; the stride-8 features have 4×."
    )
    context_blocks: int = Field(
        default=1, ge=0, le=16, description="Dilated residual blocks at stride 8."
    )


@MODELS.register("seg_tiny_teacher", args=TinySegTeacherArgs, taps=LOGITS_AT_STRIDE_8)
def build_tiny_teacher(args: TinySegTeacherArgs, num_classes: int) -> nn.Module:
    """Tiny stride-8 segmentation teacher (~1.4M params); taps: backbone (128 ch), head (logits)."""
    return TinySegNet(num_classes, args.base_channels, args.context_blocks, args.norm, args.dropout)


@MODELS.register("seg_tiny_student", args=TinySegStudentArgs, taps=LOGITS_AT_STRIDE_8)
def build_tiny_student(args: TinySegStudentArgs, num_classes: int) -> nn.Module:
    """Tiny stride-8 segmentation student (~0.13M params); taps: backbone (64 ch), head (logits)."""
    return TinySegNet(num_classes, args.base_channels, args.context_blocks, args.norm, args.dropout)


class TorchvisionAuxArgs(BaseModel):
    """Arguments of torchvision models that have an auxiliary FCN head."""

    model_config = ConfigDict(extra="forbid")

    aux_loss: bool = Field(
        default=False,
        description="Add the auxiliary head on layer3 (output key 'aux', loss weight 0.4, "
        "module 'aux_classifier').",
    )


class NoTorchvisionArgs(BaseModel):
    """torchvision models without options (LR-ASPP has no auxiliary head)."""

    model_config = ConfigDict(extra="forbid")


TorchvisionAuxFactory = Callable[..., nn.Module]


def _register_torchvision_with_aux(
    name: str, factory: TorchvisionAuxFactory, taps: str, stride: int
) -> None:
    def build(args: TorchvisionAuxArgs, num_classes: int) -> nn.Module:
        return factory(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=args.aux_loss
        )

    MODELS.register(
        name,
        args=TorchvisionAuxArgs,
        summary=f"torchvision {name}, {taps}",
        taps=classifier_taps(stride),
    )(build)


_RESNET_TAPS = (
    "random init; taps: backbone.layer4 (2048 ch, stride 8), classifier (logits, stride 8, "
    "the default), aux_classifier"
)
for _name, _taps, _stride in (
    ("deeplabv3_resnet50", _RESNET_TAPS, 8),
    ("deeplabv3_resnet101", _RESNET_TAPS, 8),
    (
        "deeplabv3_mobilenet_v3_large",
        "random init; taps: backbone.16 (960 ch, stride 16), classifier (logits, stride 16, "
        "the default), aux_classifier",
        16,
    ),
    ("fcn_resnet50", _RESNET_TAPS, 8),
    ("fcn_resnet101", _RESNET_TAPS, 8),
):
    _register_torchvision_with_aux(_name, getattr(tv_segmentation, _name), _taps, _stride)


@MODELS.register(
    "lraspp_mobilenet_v3_large",
    args=NoTorchvisionArgs,
    summary="torchvision lraspp_mobilenet_v3_large, random init; taps: backbone (levels "
    "'low' 40 ch stride 8, 'high' 960 ch stride 16), classifier (logits, stride 8, the default)",
    taps=DefaultTaps(("classifier",), ((8,),)),  # no auxiliary head
)
def build_lraspp_mobilenet_v3_large(args: NoTorchvisionArgs, num_classes: int) -> nn.Module:
    model: nn.Module = tv_segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    return model


RESNET18_STAGE_CHANNELS = {"layer3": 256, "layer4": 512}


def _dilate_stage(stage: nn.Sequential, previous: int, dilation: int) -> None:
    """Make a stride-2 ResNet stage of ``BasicBlock``s keep its input's resolution.

    torchvision's ``replace_stride_with_dilation`` refuses ``BasicBlock`` (ResNet-18/34), so the
    stride of the stage's first block (its first 3×3 conv and its 1×1 shortcut) becomes 1 and
    the 3×3 convolutions dilate instead, as torchvision does for bottleneck ResNets: the first
    convolution keeps the previous stage's dilation, every later one takes the stage's.
    """
    for index, block in enumerate(stage):
        assert isinstance(block, BasicBlock)
        for position, conv in enumerate((block.conv1, block.conv2)):
            rate = previous if index == 0 and position == 0 else dilation
            conv.stride = (1, 1)
            conv.dilation = (rate, rate)
            conv.padding = (rate, rate)
        if isinstance(block.downsample, nn.Sequential):
            shortcut = block.downsample[0]
            assert isinstance(shortcut, nn.Conv2d)
            shortcut.stride = (1, 1)


class DilatedResNetFeatures(nn.Module):
    """A ResNet at output stride 8 returning ``{"out": layer4, "aux": layer3}`` (both stride 8).

    The module names are torchvision's (``layer1`` … ``layer4``), so taps read as on its
    DeepLabV3 models (``backbone.layer4``).
    """

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        _dilate_stage(self.layer3, previous=1, dilation=2)
        _dilate_stage(self.layer4, previous=2, dilation=4)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        stage3 = self.layer3(self.layer2(self.layer1(x)))
        return {"out": self.layer4(stage3), "aux": stage3}


class DeepLabV3ResNet18Args(TorchvisionAuxArgs):
    """Arguments of ``deeplabv3_resnet18``."""

    backbone_weights: LocalPath | None = Field(
        default=None,
        description="Local state-dict file of torchvision's resnet18 classification network "
        "(ImageNet, as the paper's student starts from); none: random initialisation.",
    )


def _load_resnet_weights(resnet: nn.Module, path: str) -> None:
    """The classification network's state dict, whole: a partial match is a wrong file.

    BatchNorm's step counters are not weights, and the files torchvision publishes lack them.
    """
    state = read_state_dict(path, field="args.backbone_weights")
    own = resnet.state_dict()
    counter = "num_batches_tracked"
    missing = [key for key in own if key not in state and not key.endswith(counter)]
    unexpected = [key for key in state if key not in own]
    wrong_shape = [key for key in state if key in own and state[key].shape != own[key].shape]
    if missing or unexpected or wrong_shape:
        raise SpecError(
            f"backbone_weights {path!r} are not torchvision's resnet18: {len(missing)} missing "
            f"keys ({', '.join(missing[:3])}), {len(unexpected)} unexpected keys "
            f"({', '.join(unexpected[:3])}), {len(wrong_shape)} of the wrong shape "
            f"({', '.join(wrong_shape[:3])}); save torchvision.models.resnet18's state dict",
            field="args.backbone_weights",
        )
    resnet.load_state_dict(state, strict=False)


@MODELS.register(
    "deeplabv3_resnet18",
    args=DeepLabV3ResNet18Args,
    summary="DeepLabV3 on a dilated ResNet-18 (output stride 8, the paper's Cityscapes student), "
    "from torchvision parts, random init unless backbone_weights; taps: backbone.layer4 "
    "(512 ch, stride 8), classifier (logits, stride 8, the default), aux_classifier (FCN head "
    "on layer3, with aux_loss)",
    taps=classifier_taps(8),
)
def build_deeplabv3_resnet18(args: DeepLabV3ResNet18Args, num_classes: int) -> nn.Module:
    resnet = resnet18(weights=None)
    if args.backbone_weights is not None:
        _load_resnet_weights(resnet, args.backbone_weights)
    aux_head = FCNHead(RESNET18_STAGE_CHANNELS["layer3"], num_classes) if args.aux_loss else None
    model: nn.Module = DeepLabV3(
        DilatedResNetFeatures(resnet),
        DeepLabHead(RESNET18_STAGE_CHANNELS["layer4"], num_classes),
        aux_head,
    )
    return model
