from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maskd_core.errors import SpecError
from maskd_core.tokens import ReceptiveTokens, TokenSet, load_tokens, save_tokens


def dense_masks(tokens: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(torch.einsum("tc,nchw->nthw", tokens, feature))


def dense_weights(module: ReceptiveTokens, feature: torch.Tensor) -> torch.Tensor:
    assert module.weighting is not None
    conv3, _, conv1 = module.weighting
    hidden = F.conv2d(feature, conv3.weight, conv3.bias, padding=1).mean(dim=(2, 3))
    logits = hidden @ conv1.weight.flatten(1).T + conv1.bias
    return torch.softmax(logits, dim=1)


def test_init_follows_the_paper() -> None:
    torch.manual_seed(0)
    module = ReceptiveTokens(256, 64, weighting=True)
    assert module.tokens.shape == (64, 256)
    assert abs(module.tokens.std().item() - 0.01) < 1e-3
    assert module.weighting is not None
    conv3, conv1 = module.weighting[0], module.weighting[2]
    assert abs(conv3.weight.std().item() - math.sqrt(2 / (9 * 256))) < 2e-3
    assert abs(conv1.weight.std().item() - math.sqrt(2 / 64)) < 2e-2
    assert not conv3.bias.any() and not conv1.bias.any()
    assert ReceptiveTokens(8, 2, weighting=False).weighting is None


def test_masks_and_weights_match_dense_formulas() -> None:
    torch.manual_seed(0)
    module = ReceptiveTokens(5, 4, weighting=True)
    module.tokens.data.normal_()
    feature = torch.randn(2, 5, 6, 7)
    masks = module.masks(feature)
    assert masks.shape == (2, 4, 6, 7)
    torch.testing.assert_close(masks, dense_masks(module.tokens, feature))
    weights = module.weights(feature)
    assert weights is not None and weights.shape == (2, 4)
    torch.testing.assert_close(weights, dense_weights(module, feature))
    torch.testing.assert_close(weights.sum(1), torch.ones(2))


@pytest.mark.parametrize("weighting", [False, True])
def test_masked_feature_matches_dense_reference(weighting: bool) -> None:
    torch.manual_seed(0)
    module = ReceptiveTokens(5, 3, weighting=weighting)
    module.tokens.data.normal_()
    feature = torch.randn(2, 5, 4, 4)
    masked, masks = module.mask_feature(feature)
    dense = dense_masks(module.tokens, feature).unsqueeze(2) * feature.unsqueeze(1)  # [N,T,C,H,W]
    if weighting:
        p = dense_weights(module, feature)
        expected = (p[:, :, None, None, None] * dense).sum(1)
    else:
        expected = dense.sum(1)
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(masks, dense_masks(module.tokens, feature))


def test_masks_are_fp32_under_autocast() -> None:
    module = ReceptiveTokens(4, 2, weighting=True)
    feature = torch.randn(1, 4, 3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.masks(feature).dtype == torch.float32
        weights = module.weights(feature)
        assert weights is not None and weights.dtype == torch.float32
        assert module.mask_feature(feature)[0].dtype == torch.bfloat16


LEVELS = [
    {"teacher_layer": "neck", "level": 0, "channels": 4},
    {"teacher_layer": "neck", "level": 1, "channels": 6},
]
TEACHER = {"arch": "t", "args": {"width": 4}, "weights_sha256": "abc"}


def test_tokens_artifact_roundtrip_with_weights_only(tmp_path: Path) -> None:
    tokens = TokenSet([4, 6], 3, weighting=True)
    path = tmp_path / "tokens.pt"
    save_tokens(path, tokens, LEVELS, TEACHER)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "maskd-tokens/1" and raw["levels"] == LEVELS and raw["tokens"] == 3
    loaded = load_tokens(path, LEVELS, 3, True, TEACHER)
    for key, value in tokens.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_tokens_artifact_mismatches_are_spec_errors(tmp_path: Path) -> None:
    path = tmp_path / "tokens.pt"
    save_tokens(path, TokenSet([4, 6], 3, weighting=False), LEVELS, TEACHER)
    other_levels = [LEVELS[0], {**LEVELS[1], "channels": 8}]
    with pytest.raises(SpecError, match="learned for levels"):
        load_tokens(path, other_levels, 3, False)
    with pytest.raises(SpecError, match="tokens=3"):
        load_tokens(path, LEVELS, 4, False)
    with pytest.raises(SpecError, match="weights_sha256"):
        load_tokens(path, LEVELS, 3, False, {**TEACHER, "weights_sha256": "def"})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SpecError, match="cannot be read"):
        load_tokens(tmp_path / "junk.pt", LEVELS, 3, False)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (4, 1), (7, 9)])
def test_closed_form_weights_equal_the_branch_modules(size: tuple[int, int]) -> None:
    """The closed-form GAP∘conv3x3 is the same function, values and gradients, at any size."""
    torch.manual_seed(0)
    module = ReceptiveTokens(6, 4, weighting=True)
    assert module.weighting is not None
    feature = torch.randn(3, 6, *size, requires_grad=True)
    closed = module.weights(feature)
    assert closed is not None
    reference = torch.softmax(module.weighting(feature).flatten(1), dim=1)
    torch.testing.assert_close(closed, reference, rtol=1e-5, atol=1e-6)
    probe = torch.randn(3, 4)
    grads = torch.autograd.grad((closed * probe).sum(), [feature, module.weighting[0].weight])
    expected = torch.autograd.grad((reference * probe).sum(), [feature, module.weighting[0].weight])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
