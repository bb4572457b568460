"""Stage-2 distillation methods, chosen by ``stage2.method``: MasKD and the baselines beside it.

Each method is a ``Distiller`` subclass registered in ``METHODS`` with a pydantic model of its
hyperparameters (unknown ones are refused). Stage 2 owns what every method shares: the frozen
teacher's forward, the taps, and one student→teacher align per level (``stage2.align``). A
distiller turns the aligned student levels and the teacher levels into one unweighted loss; the
stage adds ``weight · loss`` to the student's task loss and reports the unweighted value as
``kd_loss``. A distiller's own parameters (MGD's generators, for instance) train with the student
and the aligns, in the same optimiser and checkpoint.

The weights of these methods live on different scales (docs/methods.md): MasKD and FitNet are
per-element means, O(1–10); MGD and AMD sum squared errors over C·H·W and divide by the batch,
so their weights are O(1e-5). A weight is never carried across methods. FitNet's per-element
mean is where the tapped level changes what a weight means (segmentation logits square to ~50x
a feature map's elements), so its default follows the taps (``distils_logits``).

The contract (``Distiller``, ``MethodSetup``, the registry) is in ``maskd_core.methods_base``;
DFMSD, SAMKD and PCD, the related work's masked methods, in ``maskd_core.methods_masked``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

# The new methods register themselves on import, so the registry is complete with this module.
import maskd_core.methods_masked  # noqa: F401
from maskd_core.losses import maskd_loss
from maskd_core.methods_base import METHODS as METHODS
from maskd_core.methods_base import Distiller as Distiller
from maskd_core.methods_base import MethodParams as MethodParams
from maskd_core.methods_base import MethodSetup as MethodSetup
from maskd_core.methods_base import distils_logits as distils_logits
from maskd_core.methods_base import generation_block, to_teacher_size
from maskd_core.models import MODELS
from maskd_core.models.detection import FCOS_FAMILY, RETINANET, TWO_STAGE
from maskd_core.plan import JobPlan
from maskd_core.spec import JobSpec, MaskdParams, MethodSpec
from maskd_core.tokens import ReceptiveTokens, TokenSet


def effective_params(setup: MethodSetup) -> dict[str, Any]:
    """``setup.method``'s params with its defaults spelled out, the weight a default of the
    task and taps chose included: what a run of it actually used."""
    method = setup.method
    build = METHODS.get(method.name, field="stage2.method.name")
    params = METHODS.parse_args(method.name, method.params, field="stage2.method.params")
    spelled: dict[str, Any] = params.model_dump(mode="json")
    if build.weight_field is not None:
        spelled[build.weight_field] = build.resolved_weight(params, setup)
    return spelled


def method_setup(
    spec: JobSpec, plan: JobPlan, method: MethodSpec, tokens: TokenSet | None
) -> MethodSetup:
    """The setup of ``method`` in job ``spec`` with ``plan``: the student's family comes from
    its registry entry, the one owner of which family a model is (none for a network built
    outside the registry, as tests and benches pass to the stages)."""
    arch = spec.distilled_student.arch
    family = MODELS.entry(arch).family if arch in MODELS else None
    return MethodSetup(
        plan.levels,
        spec.task,
        method,
        tokens,
        plan.num_classes,
        plan.aux,
        family,
        spec.stage2.iterations,
    )


def check_methods_against_plan(spec: JobSpec, plan: JobPlan) -> None:
    """Every method the job runs against the planned levels (``Distiller.check_setup``), so a
    method that cannot distil these taps (a logit method on features) is refused at submission,
    at the field of its entry (``stage2.method`` or ``comparison.methods[i]``)."""
    entries = [("stage2.method", spec.stage2.method)]
    if spec.comparison is not None:
        entries = [(f"comparison.methods[{i}]", m) for i, m in enumerate(spec.comparison.methods)]
    for where, method in entries:
        build = METHODS.get(method.name, field=f"{where}.name")
        params = METHODS.parse_args(method.name, method.params, field=f"{where}.params")
        build.check_setup(params, method_setup(spec, plan, method, None), where)


def build_distiller(setup: MethodSetup) -> Distiller:
    """The method ``setup.method`` names, with its params checked by its model."""
    method = setup.method
    build = METHODS.get(method.name, field="stage2.method.name")
    return build(
        METHODS.parse_args(method.name, method.params, field="stage2.method.params"), setup
    )


def job_needs_tokens(spec: JobSpec) -> bool:
    """Whether any method the job runs needs stage 1 (a comparison shares one stage 1)."""
    return any(METHODS.get(m.name, field="stage2.method.name").needs_tokens for m in spec.methods())


def distill_level(
    tokens: ReceptiveTokens,
    aligned: torch.Tensor,
    teacher: torch.Tensor,
    custom_mask: bool,
    eps: float,
) -> torch.Tensor:
    """The MasKD loss of one level from the aligned student and the teacher feature.

    Masks and token weights come from the frozen tokens on the teacher feature; with
    ``custom_mask`` each mask is multiplied by the one the same tokens give on the aligned
    student, computed without gradient as in the paper. The student is resized to the teacher's
    H×W when their strides differ.
    """
    aligned = to_teacher_size(aligned, teacher)
    masks = tokens.masks(teacher)
    if custom_mask:
        with torch.no_grad():
            masks = masks * tokens.masks(aligned)
    return maskd_loss(aligned, teacher, masks, tokens.weights(teacher), eps)


MASKD_WEIGHT = 1.0
"""MasKD's weight when left out for segmentation, and for a detector of no known family."""
MASKD_WEIGHT_BY_FAMILY = {
    RETINANET.name: 7.0,
    FCOS_FAMILY.name: 10.0,
    "reppoints": 10.0,  # the paper's; no RepPoints detector is registered yet
    TWO_STAGE.name: 1.0,
}
"""MasKD's weight when left out for a detection student of each family: the official configs'
(mmrazor/configs/distill/maskd: RetinaNet 7, FCOS and RepPoints 10, Faster R-CNN 1)."""


@METHODS.register("maskd", args=MaskdParams, summary="MasKD: masked distillation (default)")
class MaskdDistiller(Distiller):
    """loss_weight · Σ_levels MasKD loss through the frozen stage-1 tokens (docs/method.md)."""

    needs_tokens = True
    weight_field = "loss_weight"

    @classmethod
    def default_weight(cls, setup: MethodSetup) -> float:
        if setup.task == "detection" and setup.family is not None:
            return MASKD_WEIGHT_BY_FAMILY.get(setup.family, MASKD_WEIGHT)
        return MASKD_WEIGHT

    def __init__(self, params: MaskdParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        tokens = setup.tokens
        if tokens is None:
            raise ValueError("MasKD needs the stage-1 tokens")
        self.weight = self.resolved_weight(params, setup)
        # A submodule so it follows the distiller's device; frozen, so stage 2 neither trains
        # nor checkpoints it.
        self.tokens = tokens
        self.custom_mask = params.custom_mask
        self.custom_mask_warmup = params.custom_mask_warmup
        self.eps = params.mask_eps
        self.aux_weight = params.aux_weight
        self.aux_tokens_level = 0
        if params.aux_weight is not None:
            if setup.aux is None:
                raise ValueError("aux_weight needs the auxiliary heads planned (JobPlan.aux)")
            self.aux_layer = setup.aux.layer
            self.aux_tokens_level = setup.aux.tokens_level

    def loss(
        self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], step: int
    ) -> torch.Tensor:
        # Tied to the global step, not a counter, so a resumed run switches at the same step.
        custom = self.custom_mask and step >= self.custom_mask_warmup
        return torch.stack(
            [
                distill_level(self.tokens.level(k), s, t, custom, self.eps)
                for k, (s, t) in enumerate(zip(students, teachers, strict=True))
            ]
        ).sum()

    def aux_loss(self, student: torch.Tensor, teacher: torch.Tensor, step: int) -> torch.Tensor:
        """aux_weight · the MasKD loss of the aux logits through the main logits' tokens.

        As the official segmentation recipe does: the masks come from the same frozen tokens
        applied to the teacher's aux logits (stage 1 learns none for the aux head), and the aux
        heads' logits need no align (validation checked their channels match).
        """
        if self.aux_weight is None:
            raise RuntimeError("aux_loss called without aux_weight")
        custom = self.custom_mask and step >= self.custom_mask_warmup
        tokens = self.tokens.level(self.aux_tokens_level)
        return self.aux_weight * distill_level(tokens, student, teacher, custom, self.eps)


@METHODS.register("none", summary="no distillation: the student's task loss alone")
class NoDistiller(Distiller):
    """The no-KD baseline: same student, data and schedule, task loss only."""

    uses_teacher = False

    weight = 0.0


FITNET_WEIGHT = 1.0
"""FitNet's weight on feature maps: the hint loss as the paper and most baselines weigh it."""
FITNET_LOGITS_WEIGHT = 0.1
"""FitNet's weight when a level is segmentation logits (docs/methods.md, with the measurement)."""


class FitnetParams(MethodParams):
    weight: float | None = Field(
        default=None,
        ge=0.0,
        description="Multiplies Σ_levels mean (A(S) − F)²: a per-element mean, on MasKD's "
        f"scale (O(1–10)), not MGD's. none: {FITNET_LOGITS_WEIGHT:g} when a level is "
        "segmentation logits, whose elements square to ~50x a feature map's, "
        f"{FITNET_WEIGHT:g} otherwise.",
    )


@METHODS.register("fitnet", args=FitnetParams, summary="FitNet: MSE on aligned features")
class FitnetDistiller(Distiller):
    """FitNets (Romero et al., ICLR 2015) hint loss: weight · Σ_levels mean_{n,c,h,w}(A(S) − F)².

    The mean over every element keeps the weight independent of feature size, like MasKD's.
    """

    weight_field = "weight"

    def __init__(self, params: FitnetParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.weight = self.resolved_weight(params, setup)

    @classmethod
    def default_weight(cls, setup: MethodSetup) -> float:
        return FITNET_LOGITS_WEIGHT if distils_logits(setup) else FITNET_WEIGHT

    def loss(
        self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], step: int
    ) -> torch.Tensor:
        return torch.stack(
            [
                F.mse_loss(to_teacher_size(s, t).float(), t.float())
                for s, t in zip(students, teachers, strict=True)
            ]
        ).sum()


MASK_RATIO_BY_TASK = {"detection": 0.65, "segmentation": 0.75}
"""MGD's λ when left out: RetinaNet/RepPoints (one-stage) detection and Cityscapes segmentation."""


MGD_ALPHA = 2e-5
"""MGD's α on every tap, logits included: its one-stage detection and segmentation configs.
A sum over C·H·W grows with a tap's width, so logits (a few channels) weigh no more than
features; docs/methods.md has the measurement."""


class MgdParams(MethodParams):
    alpha: float = Field(
        default=MGD_ALPHA,
        ge=0.0,
        description="Multiplies Σ(G(A(S)⊙R) − F)²/N, a sum over C·H·W: hence O(1e-5). MGD uses "
        "2e-5 for one-stage detectors and segmentation (on logits too), 5e-7 for two-stage "
        "detectors.",
    )
    mask_ratio: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="λ, the share of masked pixels; none: 0.65 for detection (one-stage), "
        "0.75 for segmentation, as in the MGD configs (0.45 for two-stage detectors).",
    )


def generation_loss(generated: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ_{c,h,w,n} (G − F)² / N in fp32: MGD's summed squared error over the batch size."""
    diff = generated.float() - teacher.float()
    return diff.pow(2).sum() / generated.shape[0]


@METHODS.register("mgd", args=MgdParams, summary="MGD: masked generative distillation")
class MgdDistiller(Distiller):
    """MGD (Yang et al., ECCV 2022): regenerate the teacher feature from a masked student one.

    Per level, R ∈ {0,1}^{N×1×H×W} with P(R=0) = λ, drawn fresh every call from the global RNG
    (so a resumed run draws the same masks); one generator G per level; loss
    α · Σ_levels Σ (G(A(S) ⊙ R) − F)² / N.
    """

    weight_field = "alpha"

    def __init__(self, params: MgdParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.weight = self.resolved_weight(params, setup)
        ratio = params.mask_ratio
        self.mask_ratio = MASK_RATIO_BY_TASK[setup.task] if ratio is None else ratio
        self.generators = nn.ModuleList(
            generation_block(lv.teacher_channels) for lv in setup.levels
        )

    def spatial_mask(self, student: torch.Tensor) -> torch.Tensor:
        """R [N,1,H,W] of the student (float 0/1), 0 where a pixel is hidden."""
        n, _, h, w = student.shape
        draw = torch.rand((n, 1, h, w), device=student.device)
        return (draw >= self.mask_ratio).to(student.dtype)

    def regenerate(self, level: int, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """G(A(S) ⊙ R) of one level."""
        generated: torch.Tensor = self.generators[level](student * mask)
        return generated

    def loss(
        self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], step: int
    ) -> torch.Tensor:
        total = []
        for k, (s, t) in enumerate(zip(students, teachers, strict=True)):
            s = to_teacher_size(s, t)
            total.append(generation_loss(self.regenerate(k, s, self.spatial_mask(s)), t))
        return torch.stack(total).sum()


class AmdParams(MgdParams):
    reduction: int = Field(
        default=16,
        gt=0,
        description="Channel reduction of the channel-adaptive (squeeze-excitation) module.",
    )


class ChannelAdaptive(nn.Module):
    """Squeeze-excitation: x ⊙ sigmoid(W2 · ReLU(W1 · GAP(x))), one weight per channel."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.squeeze = nn.Linear(channels, hidden)
        self.excite = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


@METHODS.register(
    "amd", args=AmdParams, summary="AMD (our reading of the paper): attention-masked MGD"
)
class AmdDistiller(MgdDistiller):
    """AMD (our reading of Yang et al., arXiv 2301.13538; no public code exists).

    MGD with two changes, per level:

    1. Attention-guided mask instead of a random one: the spatial attention of the aligned
       student is a = mean_c |A(S)| (computed without gradient); the ⌊λ·H·W⌋ pixels of each
       image with the highest attention are hidden (R = 0), the rest kept (R = 1), so the
       generator must rebuild the teacher's most salient regions from their context. (An
       FGD-style softmax over H·W with a temperature ranks pixels identically, so it is left
       out.)
    2. A channel-adaptive module CA (squeeze-excitation, reduction r) on the generated feature.

    Loss α · Σ_levels Σ (CA(G(A(S) ⊙ R)) − F)² / N, with MGD's α and λ as defaults since the
    paper builds on MGD's settings.
    """

    def __init__(self, params: AmdParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.channel_adaptive = nn.ModuleList(
            ChannelAdaptive(lv.teacher_channels, params.reduction) for lv in setup.levels
        )

    def spatial_mask(self, student: torch.Tensor) -> torch.Tensor:
        n, _, h, w = student.shape
        hidden = math.floor(self.mask_ratio * h * w)
        with torch.no_grad():
            attention = student.abs().mean(dim=1).reshape(n, h * w)
            mask = torch.ones_like(attention)
            if hidden:
                top = attention.topk(hidden, dim=1).indices
                mask.scatter_(1, top, 0.0)
        return mask.reshape(n, 1, h, w).to(student.dtype)

    def regenerate(self, level: int, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        adapted: torch.Tensor = self.channel_adaptive[level](
            super().regenerate(level, student, mask)
        )
        return adapted
