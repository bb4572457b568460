"""The two MasKD losses, written so that no [N,T,C,H,W] tensor is ever built.

Both reduce in fp32 whatever the autocast dtype: the Dice ratio and the area-normalised error
are sums over every pixel of a feature map, which half precision cannot hold accurately.
"""

from __future__ import annotations

from typing import Any

import torch

DICE_EPS = 1e-12


def dice_diversity(masks: torch.Tensor) -> torch.Tensor:
    """Mean pairwise Dice coefficient between the T masks of each image (stage 1).

    ``masks`` is [N,T,H,W]. For every ordered pair i≠j, D_ij = 2<m_i,m_j> / ((|m_i|²+ε) +
    (|m_j|²+ε)); the mean runs over images and the T(T−1) off-diagonal pairs. The diagonal is
    excluded because self-similarity is 1 whatever the masks are and would swamp the term. The
    coefficient itself is minimised, pushing the masks towards disjoint regions.
    """
    n, t = masks.shape[:2]
    if t < 2:
        return masks.new_zeros((), dtype=torch.float32)
    with torch.autocast(masks.device.type, enabled=False):
        flat = masks.float().reshape(n, t, -1)
        inner = torch.bmm(flat, flat.transpose(1, 2))  # [N,T,T]
        sq = torch.diagonal(inner, dim1=1, dim2=2) + DICE_EPS  # [N,T]
        dice = 2 * inner / (sq.unsqueeze(2) + sq.unsqueeze(1))
        off_diagonal = ~torch.eye(t, dtype=torch.bool, device=masks.device)
        return dice[:, off_diagonal].mean()


class _ChannelMeanSquaredError(torch.autograd.Function):
    """D[n,hw] = mean_c (S−F)², keeping only S−F alive for the backward pass.

    Autograd through ``(S − F).pow(2).mean(1)`` holds the difference and its square, and its
    backward builds further [N,C,H,W] temporaries; these dominate the loss's memory on large
    FPN levels. Here the forward takes a norm (no squared copy) and the backward writes the
    student's gradient directly.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        diff = student - teacher
        ctx.save_for_backward(diff)
        norm: torch.Tensor = torch.linalg.vector_norm(diff, dim=1)
        return norm.pow(2) / diff.shape[1]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (diff,) = ctx.saved_tensors
        grad_student = diff * (grad * (2.0 / diff.shape[1])).unsqueeze(1)
        grad_teacher = -grad_student if ctx.needs_input_grad[1] else None
        return grad_student if ctx.needs_input_grad[0] else None, grad_teacher


def maskd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masks: torch.Tensor,
    weights: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The stage-2 masked reconstruction loss of one level.

    ``student`` (aligned) and ``teacher`` are [N,C,H,W], ``masks`` [N,T,H,W], ``weights`` [N,T]
    or None for uniform 1/T. Per image and token r = mean_c Σ_hw M²(S−F)² / (Σ_hw M + eps), and
    the loss is mean_n Σ_t p_t r_t. The denominator does not depend on c, so the channel mean can
    be taken first: D = mean_c (S−F)² is [N,HW] and the numerator an einsum with M² [N,T,HW].
    """
    n, t = masks.shape[:2]
    with torch.autocast(student.device.type, enabled=False):
        error: torch.Tensor = _ChannelMeanSquaredError.apply(student.float(), teacher.float())
        error = error.reshape(n, -1)  # [N,HW]
        flat = masks.float().reshape(n, t, -1)  # [N,T,HW]
        per_token = torch.einsum("nth,nh->nt", flat.pow(2), error) / (flat.sum(dim=2) + eps)
        if weights is None:
            return per_token.mean(dim=1).mean()
        return (weights.float() * per_token).sum(dim=1).mean()
