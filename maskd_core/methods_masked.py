"""The related work's masked-distillation methods: DFMSD, SAMKD and PCD (docs/methods.md).

DFMSD and SAMKD have no public code, so each is *our reading* of its paper (arXiv 2407.13147,
2501.07101): the mechanisms the paper names, with every choice the text leaves open written
down in docs/methods.md. PCD (arXiv 2505.24310) has the authors' code (mdistiller's
``PCD_loss``); we follow its loss and defaults where it matches the paper's formulas, and the
paper where they differ.

DFMSD and SAMKD distil any tap (backbone, neck or logits). PCD distils class logits only, so it
refuses a job whose levels are not class logits (``check_setup``) at submission: a segmentation
model's, or a one-stage detector's (``head.classification_head.level_logits``, one level per FPN
level, a row of class logits per anchor and pixel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from maskd_core.errors import SpecError
from maskd_core.methods_base import (
    METHODS,
    Distiller,
    MethodParams,
    MethodSetup,
    distils_logits,
    generation_block,
    level_is_logits,
    to_teacher_size,
)
from maskd_core.models.detection import CLASS_LOGITS, DETECTOR_FAMILIES
from maskd_core.plan import LevelPlan

ATTENTION_TEMPERATURE = 0.5
"""T of the teacher's spatial and channel attention, as in FGD, on which this line of work
(AMD, DFMSD, SAMKD) builds its attention-guided masks."""

STANDARDISE_EPS = 1e-5
"""Keeps a constant channel's standardisation finite (its variance over H·W is 0)."""


def spatial_attention(feature: torch.Tensor, temperature: float) -> torch.Tensor:
    """H·W · softmax_hw(mean_c |F| / T) [N,1,H,W]: 1 on average, above 1 where F is salient."""
    n, _, h, w = feature.shape
    energy = feature.detach().float().abs().mean(dim=1).reshape(n, h * w)
    return (h * w * torch.softmax(energy / temperature, dim=1)).reshape(n, 1, h, w)


def channel_attention(feature: torch.Tensor, temperature: float) -> torch.Tensor:
    """C · softmax_c(mean_hw |F| / T) [N,C,1,1]: 1 on average, above 1 on salient channels."""
    c = feature.shape[1]
    energy = feature.detach().float().abs().mean(dim=(2, 3))
    return (c * torch.softmax(energy / temperature, dim=1))[:, :, None, None]


def keep_top(scores: torch.Tensor, hidden: int, largest: bool) -> torch.Tensor:
    """1 everywhere but at the ``hidden`` entries of each row of ``scores`` [N,K] that are the
    largest (``largest``) or the smallest, where it is 0."""
    keep = torch.ones_like(scores)
    if hidden:
        keep.scatter_(1, scores.topk(hidden, dim=1, largest=largest).indices, 0.0)
    return keep


def standardise(feature: torch.Tensor) -> torch.Tensor:
    """Each (image, channel) map to mean 0 and variance 1 over H·W, in fp32."""
    x = feature.float()
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + STANDARDISE_EPS)


def phase(step: int, iterations: int, phases: int) -> int:
    """Which of ``phases`` equal parts of a run of ``iterations`` steps ``step`` is in (0-based);
    the last one when the run's length is unknown (0) or the step lies past it."""
    if iterations <= 0:
        return phases - 1
    return min(phases - 1, step * phases // iterations)


# ----------------------------------------------------------------------------------------------
# DFMSD


class DfmsdParams(MethodParams):
    weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Multiplies Σ_levels mean_{n,c,h,w} W·(std(G(A(S)⊙R_s⊙R_c)) − T_k)²: a "
        "per-element mean of standardised features, so O(1) on any tap (logits included).",
    )
    spatial_ratio: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="Share of each image's pixels hidden from the student: those of the lowest "
        "teacher spatial attention (our choice: the paper's values are not public).",
    )
    channel_ratio: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="Share of channels hidden from the student: those of the lowest teacher "
        "channel attention (our choice).",
    )
    stages: int = Field(
        default=3,
        ge=1,
        description="Stage-wise adaptation: the run is split into this many equal phases; in "
        "phase k of K the target is k/K of the teacher and the rest the student itself.",
    )
    enhancement: float = Field(
        default=1.0,
        ge=0.0,
        description="β of the masking enhancement W = 1 + β·(k/K)·A_s: how much more the "
        "teacher's salient (object-aware) pixels weigh, growing with the phase.",
    )
    temperature: float = Field(
        default=ATTENTION_TEMPERATURE,
        gt=0.0,
        description="T of the teacher's spatial and channel attention (FGD's 0.5).",
    )


@METHODS.register(
    "dfmsd",
    args=DfmsdParams,
    summary="DFMSD (our reading of the paper): dual-masked, stage-wise adapted distillation",
)
class DfmsdDistiller(Distiller):
    """DFMSD (our reading of Zhang et al., arXiv 2407.13147; no public code exists).

    Per level, with F the teacher, S' = A(S) the aligned student and std(·) each (image,
    channel) map standardised over H·W (the per-level semantic alignment):

    - dual masking: R_s hides the pixels of lowest teacher spatial attention, R_c the channels
      of lowest teacher channel attention, so the student keeps the object-aware part;
    - a generator G (MGD's block) rebuilds the teacher from std(S') ⊙ R_s ⊙ R_c;
    - stage-wise adaptation: in phase k of K (the run in K equal parts, by global step) the
      target is T_k = (k/K)·std(F) + (1 − k/K)·std(S').detach(), the teacher reached at the
      last phase, so a distant (heterogeneous) student is brought to it progressively;
    - masking enhancement: the squared error is weighted by W = 1 + β·(k/K)·A_s, A_s the
      teacher's spatial attention (mean 1), so object regions weigh more as the phases advance.

    Loss Σ_levels mean_{n,c,h,w} W·(std(G(std(S') ⊙ R_s ⊙ R_c)) − T_k)².
    """

    weight_field = "weight"

    def __init__(self, params: DfmsdParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.weight = self.resolved_weight(params, setup)
        self.params = params
        self.iterations = setup.iterations
        self.generators = nn.ModuleList(
            generation_block(lv.teacher_channels) for lv in setup.levels
        )

    def progress(self, step: int) -> float:
        """k/K of the phase ``step`` is in: the teacher's share of the target."""
        stages = self.params.stages
        return (phase(step, self.iterations, stages) + 1) / stages

    def masks(self, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_s [N,1,H,W], R_c [N,C,1,1]) from the teacher's attention, 0 where hidden."""
        n, c, h, w = teacher.shape
        params = self.params
        spatial = spatial_attention(teacher, params.temperature).reshape(n, h * w)
        channel = channel_attention(teacher, params.temperature).reshape(n, c)
        keep_s = keep_top(spatial, math.floor(params.spatial_ratio * h * w), largest=False)
        keep_c = keep_top(channel, math.floor(params.channel_ratio * c), largest=False)
        return keep_s.reshape(n, 1, h, w), keep_c.reshape(n, c, 1, 1)

    def level_loss(
        self, level: int, student: torch.Tensor, teacher: torch.Tensor, step: int
    ) -> torch.Tensor:
        progress = self.progress(step)
        student = standardise(to_teacher_size(student, teacher))
        target = standardise(teacher)
        target = progress * target + (1.0 - progress) * student.detach()
        keep_s, keep_c = self.masks(teacher)
        generated = standardise(self.generators[level](student * keep_s * keep_c))
        enhance = 1.0 + self.params.enhancement * progress * spatial_attention(
            teacher, self.params.temperature
        )
        return (enhance * (generated - target).pow(2)).mean()

    def loss(
        self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], step: int
    ) -> torch.Tensor:
        return torch.stack(
            [
                self.level_loss(k, s, t, step)
                for k, (s, t) in enumerate(zip(students, teachers, strict=True))
            ]
        ).sum()


# ----------------------------------------------------------------------------------------------
# SAMKD

SAMKD_WEIGHT = 1.0
"""SAMKD's weight on feature maps: its terms are per-element means, on FitNet's scale."""
SAMKD_LOGITS_WEIGHT = 0.1
"""SAMKD's weight when a level is class logits, for FitNet's reason (docs/methods.md): logits
square to ~50x a feature map's elements (measured on segmentation logits; a detector's, near
its focal prior's bias of -4.6, are no smaller)."""


class SamkdParams(MethodParams):
    weight: float | None = Field(
        default=None,
        ge=0.0,
        description="Multiplies Σ_levels SFD + logit_weight · Σ_logit levels SLD, per-element "
        f"means (MasKD's and FitNet's scale). none: {SAMKD_LOGITS_WEIGHT:g} when a level is "
        f"class logits, {SAMKD_WEIGHT:g} otherwise.",
    )
    grids: list[int] = Field(
        default=[1, 2, 4],
        min_length=1,
        description="The spatial pyramid, coarse to fine: each g splits the map into g×g "
        "regions, and each region hides its own most attended pixels.",
    )
    mask_ratio: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="Share of each region's pixels hidden from the student: those of highest "
        "teacher spatial attention (our choice: the paper's values are not public).",
    )
    logit_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of the masked logit term (SLD) beside the features' (SFD); it "
        "applies to levels that are class logits (a segmentation model's, or a one-stage "
        "detector's head.classification_head.level_logits) and to nothing else.",
    )
    logit_temperature: float = Field(
        default=1.0, gt=0.0, description="τ of the masked logit term's softmax."
    )
    temperature: float = Field(
        default=ATTENTION_TEMPERATURE,
        gt=0.0,
        description="T of the teacher's spatial and channel attention (FGD's 0.5).",
    )


def grid_cells(h: int, w: int, grid: int, device: torch.device) -> torch.Tensor:
    """The region of each pixel [H·W] when an H×W map is split into grid×grid regions (rows and
    columns binned as ⌊i·g/H⌋, so sizes differ by at most one when g does not divide H)."""
    rows = torch.arange(h, device=device) * grid // h
    cols = torch.arange(w, device=device) * grid // w
    return (rows[:, None] * grid + cols[None, :]).reshape(h * w)


def regional_mask(attention: torch.Tensor, grid: int, ratio: float) -> torch.Tensor:
    """R [N,1,H,W]: in each of the grid×grid regions of each image, the ⌊ratio·region size⌋
    pixels of highest ``attention`` [N,1,H,W] are hidden (0), the others kept (1)."""
    n, _, h, w = attention.shape
    flat = attention.reshape(n, h * w)
    cells = grid_cells(h, w, grid, attention.device)
    keep = torch.ones_like(flat)
    for cell in range(grid * grid):
        pixels = (cells == cell).nonzero().squeeze(1)
        hidden = math.floor(ratio * pixels.numel())
        if hidden:
            top = flat[:, pixels].topk(hidden, dim=1).indices
            keep[:, pixels] = keep[:, pixels].scatter(1, top, 0.0)
    return keep.reshape(n, 1, h, w)


def regional_mean(values: torch.Tensor, grid: int) -> torch.Tensor:
    """``values`` [N,1,H,W] replaced, pixel by pixel, by their mean over its grid×grid region."""
    n, _, h, w = values.shape
    cells = grid_cells(h, w, grid, values.device)
    flat = values.reshape(n, h * w)
    sums = flat.new_zeros(n, grid * grid).index_add_(1, cells, flat)
    counts = torch.bincount(cells, minlength=grid * grid).to(flat.dtype)
    return (sums / counts.clamp(min=1))[:, cells].reshape(n, 1, h, w)


@METHODS.register(
    "samkd",
    args=SamkdParams,
    summary="SAMKD (our reading of the paper): coarse-to-fine masked features + masked logits",
)
class SamkdDistiller(Distiller):
    """SAMKD (our reading of Zhang et al., arXiv 2501.07101; no public code exists).

    Per level, with F the teacher and S' = A(S) the aligned student:

    - SFD, spatially hierarchical feature masking: for each grid g of the pyramid (coarse to
      fine) the mask R_g hides, in every one of the g×g regions, the ⌊λ·|region|⌋ pixels of
      highest teacher spatial attention; a generator G (MGD's block, one per level) rebuilds the
      teacher from S' ⊙ R_g, and the error is weighted by the teacher's channel attention A_c
      (mean 1): SFD = mean_g mean_{n,c,h,w} A_c·(G(S' ⊙ R_g) − F)². A coarse grid hides the
      largest objects; finer ones hide every region's own salient pixels (small objects too).
    - SLD, masked logit distillation, on levels that are class logits only (a detector's rows
      are its anchors, [N·A, K, H, W], each masked and weighed like an image): the region
      weights D are the teacher–student difference mean_c (S' − F)² (no gradient) averaged
      over each region of the finest grid and scaled to mean 1 per image, so the regions where
      the student is furthest from the teacher weigh most:
      SLD = τ² · mean_{n,h,w} D · KL(softmax(F/τ) ‖ softmax(S'/τ)) over the classes.

    Loss Σ_levels SFD + logit_weight · Σ_logit levels SLD.
    """

    weight_field = "weight"

    @classmethod
    def default_weight(cls, setup: MethodSetup) -> float:
        return SAMKD_LOGITS_WEIGHT if distils_logits(setup) else SAMKD_WEIGHT

    def __init__(self, params: SamkdParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.weight = self.resolved_weight(params, setup)
        self.params = params
        self.logit_levels = [level_is_logits(setup, lv) for lv in setup.levels]
        self.generators = nn.ModuleList(
            generation_block(lv.teacher_channels) for lv in setup.levels
        )

    def feature_loss(
        self, level: int, student: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        """SFD of one level (``student`` at the teacher's size)."""
        params = self.params
        attention = spatial_attention(teacher, params.temperature)
        channels = channel_attention(teacher, params.temperature)
        terms = []
        for grid in params.grids:
            keep = regional_mask(attention, grid, params.mask_ratio).to(student.dtype)
            generated = self.generators[level](student * keep)
            terms.append((channels * (generated.float() - teacher.float()).pow(2)).mean())
        return torch.stack(terms).mean()

    def logit_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """SLD of one logits level (``student`` at the teacher's size)."""
        tau = self.params.logit_temperature
        with torch.no_grad():
            gap = (student.float() - teacher.float()).pow(2).mean(dim=1, keepdim=True)
            regions = regional_mean(gap, max(self.params.grids))
            regions = regions / regions.mean(dim=(2, 3), keepdim=True).clamp(min=1e-12)
        log_p = F.log_softmax(teacher.float() / tau, dim=1)
        log_q = F.log_softmax(student.float() / tau, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1, keepdim=True)
        return tau * tau * (regions * kl).mean()

    def loss(
        self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], step: int
    ) -> torch.Tensor:
        total = []
        for k, (s, t) in enumerate(zip(students, teachers, strict=True)):
            s = to_teacher_size(s, t)
            term = self.feature_loss(k, s, t)
            if self.logit_levels[k]:
                term = term + self.params.logit_weight * self.logit_loss(s, t)
            total.append(term)
        return torch.stack(total).sum()


# ----------------------------------------------------------------------------------------------
# PCD


class PcdParams(MethodParams):
    alpha: float = Field(
        default=1.0,
        ge=0.0,
        description="α, multiplies the summed stage losses (τ²-scaled KL, means over pixels): "
        "the authors' PCD.ALPHA 1.",
    )
    temperature: float = Field(default=4.0, gt=0.0, description="τ: the authors' PCD.T 4.")
    stages: int = Field(
        default=3,
        ge=1,
        description="S, the stages of each direction: the paper's best, 3 for a homogeneous "
        "pair (5 for a heterogeneous one).",
    )
    schedule: Literal["every_step", "progressive"] = Field(
        default="every_step",
        description="every_step: every stage of both directions at every step, as the authors' "
        "code does; progressive: the run in 2S equal phases, one stage each, fine-to-coarse "
        "then coarse-to-fine (our reading of the paper's text).",
    )
    warmup_steps: int = Field(
        default=0,
        ge=0,
        description="The loss ramps linearly from 1/warmup_steps to 1 over these steps, as the "
        "authors' code ramps it over PCD.WARMUP epochs; 0: no ramp.",
    )


def stage_groups(stages: int, schedule: str, step: int, iterations: int) -> list[int]:
    """The group counts of the stages distilled at ``step``: fine-to-coarse S, S−1, …, 1 groups,
    then coarse-to-fine 1, …, S; all of them every step, or one per phase (``progressive``)."""
    there_and_back = [*range(stages, 0, -1), *range(1, stages + 1)]
    if schedule == "every_step":
        return there_and_back
    return [there_and_back[phase(step, iterations, 2 * stages)]]


def grouped_kl(
    student: torch.Tensor, teacher: torch.Tensor, groups: int, tau: float
) -> torch.Tensor:
    """Σ_groups τ² · mean_rows (1 − cos(p, q)) · KL(p ‖ q) of one stage over rows [R,C].

    The classes of each row are ranked by |z_t − z_s| (largest first) and cut into ``groups``
    consecutive groups of ⌊C/groups⌋ (the last takes the rest); p and q are the teacher's and
    student's softmax at τ within a group, and 1 − cos(p, q) (no gradient) weighs the rows whose
    distributions differ most in that group.
    """
    rows, classes = teacher.shape
    groups = min(groups, classes)
    size = classes // groups
    order = (teacher - student).detach().abs().argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(classes, device=order.device).expand(rows, classes)
    )
    group_of = (rank // size).clamp(max=groups - 1)
    total = teacher.new_zeros(())
    for group in range(groups):
        inside = group_of == group
        log_p = F.log_softmax((teacher / tau).masked_fill(~inside, -math.inf), dim=1)
        log_q = F.log_softmax((student / tau).masked_fill(~inside, -math.inf), dim=1)
        p = log_p.exp()
        kl = torch.where(inside, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)
        with torch.no_grad():
            scale = 1.0 - F.cosine_similarity(p, log_q.exp(), dim=1)
        total = total + tau * tau * (scale * kl).mean()
    return total


def _not_logits(setup: MethodSetup, level: LevelPlan) -> str:
    """Why ``level`` is no class logits, and which taps would be, for a logit method's refusal."""
    where = f"teacher layer {level.teacher_layer!r} (level {level.level})"
    if setup.task == "segmentation":
        return (
            f"{where} gives {level.teacher_channels} channels, not one per class "
            f"({setup.num_classes}); tap only the logits (e.g. the segmentation head's "
            "classifier) in teacher.layers and student.layers"
        )
    family = DETECTOR_FAMILIES.get(setup.family or "")
    if family is not None and family.class_logits is None:
        return (
            f"a {family.name} detector's class logits are per RoI, of the proposals each model "
            "samples itself, so no level pairs the teacher's with the student's; distil the "
            "class logits of one-stage detectors (retinanet, fcos)"
        )
    return (
        f"{where} gives features, not class logits; tap the detector's class logits, "
        f"{CLASS_LOGITS!r}, in teacher.layers and student.layers"
    )


@METHODS.register("pcd", args=PcdParams, summary="PCD: progressive class-level logit distillation")
class PcdDistiller(Distiller):
    """PCD (Li et al., arXiv 2505.24310; authors' code on mdistiller, ``PCD_loss``).

    Every level is class logits [N,C,H,W]; each pixel is one row of C logits (the student at
    the teacher's size); a detector's levels are [N·A, K, H, W], a row per anchor and pixel.
    Per stage with g groups, ``grouped_kl``; the stages are g = S, …, 1 (fine-to-coarse) and
    back 1, …, S (coarse-to-fine), summed every step (``every_step``, as the authors' code) or
    one per phase of the run (``progressive``).
    Loss ramp(step) · Σ_levels Σ_stages grouped_kl.
    """

    weight_field = "alpha"

    @classmethod
    def check_setup(cls, params: BaseModel, setup: MethodSetup, field: str) -> None:
        for lv in setup.levels:
            if level_is_logits(setup, lv):
                continue
            raise SpecError(
                f"{field} 'pcd' distils class logits, but {_not_logits(setup, lv)}; or choose "
                "a feature method (maskd, samkd, dfmsd)",
                field=f"teacher.layers[{lv.pair}]",
            )

    def __init__(self, params: PcdParams, setup: MethodSetup) -> None:
        super().__init__(params, setup)
        self.weight = self.resolved_weight(params, setup)
        self.params = params
        self.iterations = setup.iterations

    def ramp(self, step: int) -> float:
        warmup = self.params.warmup_steps
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

    def loss(
        self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], step: int
    ) -> torch.Tensor:
        params = self.params
        groups = stage_groups(params.stages, params.schedule, step, self.iterations)
        total = []
        for s, t in zip(students, teachers, strict=True):
            classes = t.shape[1]
            t_rows = t.float().permute(0, 2, 3, 1).reshape(-1, classes)
            s_rows = to_teacher_size(s, t).float().permute(0, 2, 3, 1).reshape(-1, classes)
            for g in groups:
                total.append(grouped_kl(s_rows, t_rows, g, params.temperature))
        return self.ramp(step) * torch.stack(total).sum()
