"""torchvision detectors (FCOS, RetinaNet, Faster R-CNN) with a backbone chosen by name.

Registered names are the detector families, ``fcos``, ``retinanet`` and ``fasterrcnn``; the
backbone is an argument (``{"backbone": "resnet50"}``), so one entry covers ``resnet18/34/50/101``,
``mobilenet_v3_large`` and ``tiny`` (a small plain conv net for CPU runs and tests).

**What to tap.** Every model has a ``backbone`` module (torchvision's ``BackboneWithFPN``) whose
output is an ordered dict of all FPN levels, and the detector reads that dict as
``list(features.values())`` (one-stage) or by key (Faster R-CNN), so a hook that replaces it
changes what the heads see, in training and in evaluation alike. The levels are the ones MasKD
distils in the paper:

- ``fcos`` and ``retinanet``: P3-P7 (strides 8-128), keys ``0, 1, 2, p6, p7``; P6 and P7 are
  computed from P5 as in torchvision's FCOS builder;
- ``fasterrcnn``: P2-P6 (strides 4-64), keys ``0, 1, 2, 3, pool``.

``backbone.fpn`` returns the same dict and may be tapped instead.

``head.classification_head.level_logits`` (``CLASS_LOGITS``, ``fcos`` and ``retinanet``) gives the
head's class logits, one level per FPN level, [N·A, K, H, W] with A anchors per pixel (9 for
RetinaNet, 1 for FCOS): what a logit method (PCD, SAMKD's logit term) distils on a detector.
The shared ``cls_logits`` conv runs once per level, so a tap on it would keep the last level
only. A teacher forward runs the head only when a tap reads it (``taps.reads_within``).
Faster R-CNN's class logits are per RoI, of proposals each model samples itself, and no level
pairs them, so it has none to tap.

**Classes.** Datasets number their classes ``1..K`` and keep ``0`` for background; the models
are built with ``K + 1`` outputs, torchvision's convention (its COCO models have 91 outputs for
category ids up to 90). For FCOS and RetinaNet, whose classifiers are sigmoid per class, output
0 is simply never a target.

**Sizes.** ``min_size``/``max_size`` set the detector's own resize (the paper's COCO setting is
800/1333). A teacher and its student must use the same values, so that their FPN levels have the
same sizes and cover the same pixels; both run their transform on the same batch images.

**Ignore regions.** Every detector built here leaves the anchors on a target's ignore regions
(COCO crowds, VOC difficult objects) out of its classification loss, neither positive nor
negative (``maskd_core.models.detection_ignore``); its weights are torchvision's.

No weights are ever downloaded: ``backbone_weights`` is a local file with the state dict of the
torchvision classification network (e.g. ``resnet50`` ImageNet weights), loaded safely.

**Families.** Each entry names its detector family in the registry (``MODELS.entry(arch).family``);
``DETECTOR_FAMILIES`` says what a family's detectors share: which subtrees are the neck and the
head (what a student inherits from its teacher) and which module regresses the boxes once per
FPN level (what head-level KD reads). Defaults that follow the family, such as MasKD's loss
weight, look it up there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet18, resnet34, resnet50, resnet101
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from maskd_core.errors import SpecError
from maskd_core.models import MODELS, read_state_dict
from maskd_core.models.detection_ignore import honour_ignore_regions
from maskd_core.paths import LocalPath
from maskd_core.registry import DefaultTaps
from maskd_core.spec import ModelSpec

BackboneName = Literal[
    "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "tiny"
]
Levels = Literal["p3-p7", "p2-p6"]

_RESNETS: dict[str, Callable[..., Any]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}
_RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
"""Stages from the deepest, the unit of ``trainable_backbone_layers`` (``tiny`` uses them too)."""
_MAX_TRAINABLE = {"mobilenet_v3_large": 6}
"""Stages a backbone has for ``trainable_backbone_layers``; 5 unless listed."""


class DetectorArgs(BaseModel):
    """Arguments every detector takes; the family-specific ones are in the subclasses."""

    model_config = ConfigDict(extra="forbid")

    backbone: BackboneName = Field(default="resnet50", description="Backbone network.")
    tiny_width: int | None = Field(
        default=None,
        ge=8,
        le=256,
        description="Channels of the first stage of the 'tiny' backbone (doubling per stage); "
        "default 16. Only for backbone 'tiny'.",
    )
    backbone_weights: LocalPath | None = Field(
        default=None,
        description="Local state-dict file of the torchvision classification network "
        "(e.g. ImageNet resnet50) to start the backbone from; not for 'tiny'.",
    )
    norm: Literal["batchnorm", "frozen_batchnorm"] = Field(
        default="batchnorm",
        description="Backbone normalisation. 'frozen_batchnorm' (fixed statistics, as "
        "torchvision and mmdetection use with ImageNet weights) also loads torchvision's "
        "detection checkpoints, which lack BatchNorm's num_batches_tracked.",
    )
    trainable_backbone_layers: int | None = Field(
        default=None,
        ge=0,
        description="Backbone stages trained, counted from the deepest (resnet/tiny 0-5, "
        "mobilenet 0-6); the rest are frozen. Default: 3 with backbone_weights, else all.",
    )
    fpn_channels: int = Field(default=256, ge=8, le=1024, description="FPN output channels.")
    min_size: int = Field(default=800, ge=16, description="Resize the short image side to this.")
    max_size: int = Field(default=1333, ge=16, description="...unless the long side exceeds this.")
    score_thresh: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Drop detections below this score (COCO: 0.05)."
    )
    detections_per_image: int = Field(default=100, gt=0, description="Keep the best N per image.")

    @model_validator(mode="after")
    def _consistent(self) -> DetectorArgs:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) is below min_size ({self.min_size})")
        if self.tiny_width is not None and self.backbone != "tiny":
            raise ValueError(f"tiny_width applies to backbone 'tiny' only, not {self.backbone!r}")
        if self.backbone_weights is not None and self.backbone == "tiny":
            raise ValueError("backbone 'tiny' has no pretrained weights; drop backbone_weights")
        limit = _MAX_TRAINABLE.get(self.backbone, 5)
        if self.trainable_backbone_layers is not None and self.trainable_backbone_layers > limit:
            raise ValueError(
                f"trainable_backbone_layers is {self.trainable_backbone_layers}; {self.backbone} "
                f"has {limit} stages"
            )
        return self


class FCOSArgs(DetectorArgs):
    head_convs: int = Field(
        default=4, ge=0, le=8, description="3x3 conv+GroupNorm layers per head branch."
    )

    @model_validator(mode="after")
    def _group_norm_fits(self) -> FCOSArgs:
        if self.fpn_channels % 32:
            raise ValueError(
                f"fpn_channels ({self.fpn_channels}) must be a multiple of 32: the FCOS head "
                "normalises with GroupNorm(32)"
            )
        return self


class RetinaNetArgs(DetectorArgs):
    pass


class FasterRCNNArgs(DetectorArgs):
    pass


class TinyBackbone(nn.Module):
    """A plain conv net with ResNet's stage names and strides (2, 4, 8, 16, 32).

    Every stage is two 3x3 conv+norm+ReLU layers, the first strided. Naming the stages like a
    ResNet lets the same FPN wiring and layer freezing serve both. It has no ``forward`` of its
    own: ``BackboneWithFPN`` runs its children in order and keeps the stage outputs it needs.
    """

    def __init__(self, width: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        widths = [width, width, 2 * width, 4 * width, 8 * width]
        self.stage_channels = widths[1:]
        self.conv1 = _conv_block(3, widths[0], norm, stride=2, layers=1)
        self.layer1 = _conv_block(widths[0], widths[1], norm, stride=2, layers=2)
        self.layer2 = _conv_block(widths[1], widths[2], norm, stride=2, layers=2)
        self.layer3 = _conv_block(widths[2], widths[3], norm, stride=2, layers=2)
        self.layer4 = _conv_block(widths[3], widths[4], norm, stride=2, layers=2)


def _conv_block(
    c_in: int, c_out: int, norm: Callable[[int], nn.Module], stride: int, layers: int
) -> nn.Sequential:
    modules: list[nn.Module] = []
    for index in range(layers):
        modules += [
            nn.Conv2d(c_in if index == 0 else c_out, c_out, 3, stride if index == 0 else 1, 1),
            norm(c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*modules)


def _norm_layer(args: DetectorArgs) -> Callable[[int], nn.Module]:
    return FrozenBatchNorm2d if args.norm == "frozen_batchnorm" else nn.BatchNorm2d


def _load_backbone_weights(network: nn.Module, path: str) -> None:
    state = read_state_dict(path, field="args.backbone_weights")
    own = network.state_dict()
    # BatchNorm's step counters are not weights; FrozenBatchNorm2d has none and ignores them.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        raise SpecError(
            f"backbone_weights {path!r} do not fit the backbone: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected keys "
            f"({', '.join(unexpected[:3])}), {len(wrong_shape)} of the wrong shape "
            f"({', '.join(wrong_shape[:3])}); give the state dict of the torchvision "
            "classification network named by 'backbone'",
            field="args.backbone_weights",
        )
    network.load_state_dict(state, strict=False)


def _freeze(network: nn.Module, trainable_prefixes: list[str]) -> None:
    for name, parameter in network.named_parameters():
        if not any(name.startswith(prefix) for prefix in trainable_prefixes):
            parameter.requires_grad_(False)


def _extra_blocks(levels: Levels, channels: int) -> ExtraFPNBlock:
    # P6/P7 from P5 (in == out channels) as torchvision's FCOS/RetinaNet builders; Faster
    # R-CNN's P6 is a stride-2 max pool of P5.
    return LastLevelP6P7(channels, channels) if levels == "p3-p7" else LastLevelMaxPool()


def backbone_with_fpn(args: DetectorArgs, levels: Levels) -> BackboneWithFPN:
    """The backbone body, frozen as asked, under an FPN giving ``levels``."""
    norm = _norm_layer(args)
    trainable = args.trainable_backbone_layers
    if trainable is None:
        trainable = 3 if args.backbone_weights else _MAX_TRAINABLE.get(args.backbone, 5)
    first_stage = 2 if levels == "p3-p7" else 1  # ResNet layerN is C(N+1)
    if args.backbone == "mobilenet_v3_large":
        return _mobilenet_fpn(args, norm, trainable, levels)
    body: nn.Module
    if args.backbone == "tiny":
        body = TinyBackbone(args.tiny_width or 16, norm)
        in_channels = body.stage_channels[first_stage - 1 :]
    else:
        resnet = _RESNETS[args.backbone](weights=None, norm_layer=norm)
        if args.backbone_weights:
            _load_backbone_weights(resnet, args.backbone_weights)
        body = resnet
        stage2 = resnet.inplanes // 8  # 64 for BasicBlock nets, 256 for Bottleneck ones
        in_channels = [stage2 * 2 ** (i - 1) for i in range(first_stage, 5)]
    prefixes = list(_RESNET_STAGES[:trainable]) + (["bn1"] if trainable == 5 else [])
    _freeze(body, prefixes)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(k) for k, i in enumerate(range(first_stage, 5))},
        in_channels_list=in_channels,
        out_channels=args.fpn_channels,
        extra_blocks=_extra_blocks(levels, args.fpn_channels),
    )


def _mobilenet_fpn(
    args: DetectorArgs, norm: Callable[[int], nn.Module], trainable: int, levels: Levels
) -> BackboneWithFPN:
    """MobileNetV3-Large under an FPN on the last block of each stride (8/16/32, or 4-32).

    torchvision's own mobilenet FPN taps the first block of the last stage and the last block,
    two stride-32 maps; taking the end of every stride instead gives the same P3-P7/P2-P6
    pyramid as the ResNets, so tokens and levels mean the same across backbones.
    """
    network = mobilenet_v3_large(weights=None, norm_layer=norm)
    if args.backbone_weights:
        _load_backbone_weights(network, args.backbone_weights)
    features = network.features
    starts = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    stage_ends = [start - 1 for start in starts[1:]] + [len(features) - 1]  # strides 2..32
    first_stage = 2 if levels == "p3-p7" else 1
    chosen = stage_ends[first_stage:]
    freeze_before = len(features) if trainable == 0 else starts[len(starts) - trainable]
    for block in features[:freeze_before]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
    return BackboneWithFPN(
        features,
        return_layers={str(index): str(k) for k, index in enumerate(chosen)},
        in_channels_list=[features[index].out_channels for index in chosen],
        out_channels=args.fpn_channels,
        extra_blocks=_extra_blocks(levels, args.fpn_channels),
    )


@dataclass(frozen=True)
class DetectorFamily:
    """What the detectors of one family share, named as module paths of the built model."""

    name: str
    neck: tuple[str, ...]
    head: tuple[str, ...]
    box_regression: str | None
    """The conv a one-stage head runs once per FPN level to regress boxes, [N, A·4, H, W] each;
    None for two-stage detectors, whose box regression runs on RoIs each model samples itself."""
    class_logits: str | None = None
    """The module whose output is the head's class logits, one level per FPN level, each
    [N·A, K, H, W] (``ClassLogitLevels``): what a logit method distils on a detector. None for
    two-stage detectors, whose class logits are per RoI, of proposals each model samples itself,
    so no level pairs a teacher's with a student's."""
    anchors: int = 1
    """Anchors per pixel of each level (A): RetinaNet's 3 scales x 3 aspect ratios, FCOS's one
    point. torchvision's default anchors; no argument changes them."""

    @property
    def inherited(self) -> tuple[str, ...]:
        """The subtrees a student may take from its teacher: the neck and the head."""
        return (*self.neck, *self.head)


CLASS_LOGITS = "head.classification_head.level_logits"
"""The class logits of a one-stage detector built here, per FPN level (``ClassLogitLevels``)."""

RETINANET = DetectorFamily(
    "retinanet",
    ("backbone.fpn",),
    ("head",),
    "head.regression_head.bbox_reg",
    CLASS_LOGITS,
    anchors=9,
)
FCOS_FAMILY = DetectorFamily(
    "fcos", ("backbone.fpn",), ("head",), "head.regression_head.bbox_reg", CLASS_LOGITS
)
TWO_STAGE = DetectorFamily("two_stage", ("backbone.fpn",), ("rpn", "roi_heads"), None)
DETECTOR_FAMILIES = {family.name: family for family in (RETINANET, FCOS_FAMILY, TWO_STAGE)}


P3_P7 = DefaultTaps(("backbone",), ((8, 16, 32, 64, 128),))
"""One-stage detectors' default taps: the five FPN levels P3-P7 the paper distils."""
P2_P6 = DefaultTaps(("backbone",), ((4, 8, 16, 32, 64),))
"""Faster R-CNN's default taps: its five FPN levels P2-P6 (a one-stage model's P3-P7 sit at
other strides, so the two never pair on their defaults)."""


def detector_family(arch: str, field: str) -> DetectorFamily | None:
    """The family of registered model ``arch`` (at ``field`` in the spec); None for a model
    that is no detector."""
    return DETECTOR_FAMILIES.get(MODELS.entry(arch, field=field).family or "")


def state_shapes(spec: ModelSpec, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The shape of every state-dict entry of the network ``spec`` builds, without building it.

    Built on the meta device, with neither weights nor backbone weights (which change no
    shape), so a ResNet-101 detector costs a fraction of a second and no memory.
    """
    args = {key: value for key, value in spec.args.items() if key != "backbone_weights"}
    parsed = MODELS.parse_args(spec.arch, args)
    with torch.device("meta"):
        network = MODELS.get(spec.arch)(parsed, num_classes)
    return {name: tuple(value.shape) for name, value in network.state_dict().items()}


def run_through_head(model: nn.Module, images: Sequence[torch.Tensor]) -> None:
    """A one-stage detector's transform, backbone+FPN and head on ``images``, and no further:
    anchors, box decoding and NMS produce nothing a tap reads. Run under ``no_grad`` on a
    teacher; the student's own training forward runs its head anyway."""
    detector: Any = model  # a torchvision FCOS or RetinaNet: .transform, .backbone, .head
    transformed, _ = detector.transform(list(images))
    features = detector.backbone(transformed.tensors)
    detector.head(list(features.values()))


class ClassLogitLevels(nn.Module):
    """A one-stage head's class logits, one level per FPN level: each [N, A·K, H, W] from the
    head's shared ``cls_logits`` conv, given out as [N·A, K, H, W], a row of K class logits per
    anchor and pixel, so a level has a class axis as a segmentation model's logits do.

    It holds no weights and exists to be tapped (``CLASS_LOGITS``): the head calls it once with
    every level, so a tap reads all of them in FPN order (a tap on the shared conv, which runs
    once per level, would keep the last one), and a tap that replaces them (stage 1's masks)
    changes what the head goes on with.
    """

    def __init__(self, anchors: int, classes: int) -> None:
        super().__init__()
        self.anchors = anchors
        self.classes = classes

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        # The channel of anchor a and class k is a·K + k (torchvision's layout), so anchors
        # move into the batch axis by a reshape alone.
        return [
            level.reshape(level.shape[0] * self.anchors, self.classes, *level.shape[2:])
            for level in levels
        ]


def _classify_levels(head: Any, features: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's one-stage classification forward, [N, Σ H·W·A, K], with each level's
    logits routed through ``head.level_logits``."""
    levels = head.level_logits([head.cls_logits(head.conv(level)) for level in features])
    anchors = head.level_logits.anchors
    flat = []
    for logits in levels:
        rows, classes, height, width = logits.shape
        images = rows // anchors
        per_anchor = logits.view(images, anchors, classes, height, width).permute(0, 3, 4, 1, 2)
        flat.append(per_anchor.reshape(images, -1, classes))
    return torch.cat(flat, dim=1)


class RetinaNetLevelLogits(RetinaNetClassificationHead):  # type: ignore[misc]  # untyped base
    """RetinaNet's classification head with its logits tappable per level (``ClassLogitLevels``)."""

    level_logits: ClassLogitLevels

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return _classify_levels(self, x)


class FCOSLevelLogits(FCOSClassificationHead):  # type: ignore[misc]  # untyped base
    """FCOS's classification head with its logits tappable per level (``ClassLogitLevels``)."""

    level_logits: ClassLogitLevels

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return _classify_levels(self, x)


_LEVEL_LOGIT_HEADS: dict[type[nn.Module], type[nn.Module]] = {
    RetinaNetClassificationHead: RetinaNetLevelLogits,
    FCOSClassificationHead: FCOSLevelLogits,
}


def expose_class_logits(detector: RetinaNet | FCOS) -> None:
    """Give the classification head of a torchvision one-stage detector its ``level_logits``.

    The head torchvision built is re-typed, as ``honour_ignore_regions`` re-types parts: the
    subclass only routes the logits through ``ClassLogitLevels``, which holds no weights, so
    the state-dict keys, the weights and the outputs stay torchvision's.
    """
    head: Any = detector.head.classification_head
    head.__class__ = _LEVEL_LOGIT_HEADS[type(head)]
    head.level_logits = ClassLogitLevels(head.num_anchors, head.num_classes)


@MODELS.register("fcos", args=FCOSArgs, family=FCOS_FAMILY.name, taps=P3_P7)
def build_fcos(args: FCOSArgs, num_classes: int) -> FCOS:
    """FCOS (anchor-free, P3-P7); tap 'backbone' for the five FPN levels.

    Tap ``CLASS_LOGITS`` for the class logits of each level, [N, K, H, W]."""
    backbone = backbone_with_fpn(args, "p3-p7")
    head = FCOSHead(args.fpn_channels, 1, num_classes + 1, num_convs=args.head_convs)
    detector = FCOS(
        backbone,
        num_classes + 1,
        min_size=args.min_size,
        max_size=args.max_size,
        head=head,
        score_thresh=args.score_thresh,
        detections_per_img=args.detections_per_image,
    )
    expose_class_logits(detector)
    return honour_ignore_regions(detector)


@MODELS.register("retinanet", args=RetinaNetArgs, family=RETINANET.name, taps=P3_P7)
def build_retinanet(args: RetinaNetArgs, num_classes: int) -> RetinaNet:
    """RetinaNet (anchors, focal loss, P3-P7); tap 'backbone' for the five FPN levels.

    Tap ``CLASS_LOGITS`` for the class logits of each level, [N·9, K, H, W] (9 anchors)."""
    detector = RetinaNet(
        backbone_with_fpn(args, "p3-p7"),
        num_classes + 1,
        min_size=args.min_size,
        max_size=args.max_size,
        score_thresh=args.score_thresh,
        detections_per_img=args.detections_per_image,
    )
    expose_class_logits(detector)
    return honour_ignore_regions(detector)


@MODELS.register("fasterrcnn", args=FasterRCNNArgs, family=TWO_STAGE.name, taps=P2_P6)
def build_fasterrcnn(args: FasterRCNNArgs, num_classes: int) -> FasterRCNN:
    """Faster R-CNN (RPN + RoI head, P2-P6); tap 'backbone' for the five FPN levels."""
    detector = FasterRCNN(
        backbone_with_fpn(args, "p2-p6"),
        num_classes + 1,
        min_size=args.min_size,
        max_size=args.max_size,
        box_score_thresh=args.score_thresh,
        box_detections_per_img=args.detections_per_image,
    )
    return honour_ignore_regions(detector)
