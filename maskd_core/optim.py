"""Optimisers and per-step learning-rate schedules from an ``OptimizerSpec``.

The schedule is a pure function of the global step (``lr_at``) rather than a stateful
scheduler object: the loops set each group's lr before every step, so a resumed run follows the
same curve as an uninterrupted one with nothing but the step number restored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from maskd_core.spec import OptimizerSpec


def build_optimizer(params: Iterable[nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam (coupled L2 weight decay, as the official configs) or AdamW."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters to optimise")
    if spec.name == "sgd":
        return torch.optim.SGD(
            trainable, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    if spec.name == "adam":
        return torch.optim.Adam(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)


def lr_at(spec: OptimizerSpec, step: int, total_steps: int) -> float:
    """Learning rate for 0-based ``step`` of ``total_steps``.

    constant; cosine from lr to min_lr; poly ``min_lr + (lr − min_lr)(1 − step/total)^power``
    (the official segmentation schedule); step: ×0.1 at each milestone fraction passed. A
    linear warm-up over the first ``warmup_steps`` scales the result by (step+1)/warmup_steps.
    """
    progress = min(step / total_steps, 1.0)
    if spec.schedule == "cosine":
        lr = spec.min_lr + (spec.lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    elif spec.schedule == "poly":
        lr = spec.min_lr + (spec.lr - spec.min_lr) * (1 - progress) ** spec.poly_power
    elif spec.schedule == "step":
        lr = spec.lr * 0.1 ** sum(progress >= m for m in spec.step_milestones)
    else:
        lr = spec.lr
    if step < spec.warmup_steps:
        lr *= (step + 1) / spec.warmup_steps
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> None:
    """Clip the global gradient norm of the optimised parameters (no-op without a limit)."""
    if max_norm is None:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)
