from __future__ import annotations

import pytest
import torch

from maskd_core.losses import dice_diversity, maskd_loss
from maskd_core.methods import distill_level
from maskd_core.tokens import ReceptiveTokens


def dense_dice(masks: torch.Tensor) -> torch.Tensor:
    n, t = masks.shape[:2]
    total, count = torch.zeros(()), 0
    for b in range(n):
        for i in range(t):
            for j in range(t):
                if i == j:
                    continue
                mi, mj = masks[b, i].flatten(), masks[b, j].flatten()
                total += 2 * (mi * mj).sum() / ((mi @ mi + 1e-12) + (mj @ mj + 1e-12))
                count += 1
    return total / count


def dense_maskd(s, t, masks, weights, eps):  # type: ignore[no-untyped-def]
    """The official formulation: [N,T,C,H,W] masked features, per-(n,t,c) ratio, channel mean."""
    m = masks.unsqueeze(2)
    num = ((m * s.unsqueeze(1) - m * t.unsqueeze(1)) ** 2).sum(dim=(3, 4))  # [N,T,C]
    r = (num / (masks.sum(dim=(2, 3)).unsqueeze(2) + eps)).mean(2)  # [N,T]
    p = torch.full_like(r, 1 / r.shape[1]) if weights is None else weights
    return (p * r).sum(1).mean()


def test_dice_matches_dense_reference_and_excludes_diagonal() -> None:
    torch.manual_seed(0)
    masks = torch.rand(2, 4, 5, 6)
    torch.testing.assert_close(dice_diversity(masks), dense_dice(masks))
    disjoint = torch.zeros(1, 2, 2, 2)
    disjoint[0, 0, 0], disjoint[0, 1, 1] = 1, 1
    assert dice_diversity(disjoint).item() == 0.0  # a diagonal would make this 0.5
    same = torch.rand(1, 3, 4, 4).expand(1, 3, 4, 4).clone()
    same[:, 1:] = same[:, :1]
    torch.testing.assert_close(dice_diversity(same), torch.tensor(1.0))
    assert dice_diversity(torch.rand(2, 1, 3, 3)).item() == 0.0


@pytest.mark.parametrize("weighted", [False, True])
def test_maskd_loss_matches_dense_reference_values_and_gradients(weighted: bool) -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 5, 4, 6, requires_grad=True)
    t = torch.randn(2, 5, 4, 6)
    masks = torch.rand(2, 3, 4, 6)
    weights = torch.softmax(torch.randn(2, 3), 1) if weighted else None
    ours = maskd_loss(s, t, masks, weights, 1e-6)
    (grad,) = torch.autograd.grad(ours, s)
    s_ref = s.detach().clone().requires_grad_(True)
    reference = dense_maskd(s_ref, t, masks, weights, 1e-6)
    reference.backward()
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, s_ref.grad)


def test_maskd_loss_is_zero_when_student_equals_teacher() -> None:
    t = torch.randn(2, 4, 3, 3)
    assert maskd_loss(t.clone(), t, torch.rand(2, 3, 3, 3), None, 1e-6).item() == 0.0


@pytest.mark.parametrize("custom", [False, True])
def test_distill_level_matches_dense_reference_with_weighting_and_custom_masks(
    custom: bool,
) -> None:
    torch.manual_seed(0)
    tokens = ReceptiveTokens(4, 3, weighting=True).requires_grad_(False)
    tokens.tokens.data.normal_()
    teacher = torch.randn(2, 4, 6, 6)
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = distill_level(tokens, student, teacher, custom, 1e-6)
    up = torch.nn.functional.interpolate(student, size=(6, 6), mode="bilinear")
    masks = torch.sigmoid(torch.einsum("tc,nchw->nthw", tokens.tokens, teacher))
    if custom:
        masks = masks * torch.sigmoid(torch.einsum("tc,nchw->nthw", tokens.tokens, up)).detach()
    weights = tokens.weights(teacher)
    torch.testing.assert_close(loss, dense_maskd(up, teacher, masks, weights, 1e-6))
    loss.backward()
    assert student.grad is not None and tokens.tokens.grad is None


def test_maskd_loss_gradients_for_student_and_teacher_match_dense_reference() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(2, 2, 3, 4, dtype=torch.float64)
    # maskd_loss reduces in fp32, so the comparison uses fp32 tolerances.
    ours = torch.autograd.grad(maskd_loss(s, t, masks, None, 1e-6), (s, t))
    reference = torch.autograd.grad(dense_maskd(s, t, masks, None, 1e-6), (s, t))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)
