"""Receptive tokens: T learned C-vectors whose responses on a teacher feature are soft masks.

One ``ReceptiveTokens`` per distilled level (no sharing across levels, as in the paper). The
mask logits are a plain batched matmul of the tokens with the feature, with no scaling and no
normalisation, squashed per pixel by a sigmoid; they are computed in fp32 because un-normalised
features with hundreds of channels saturate a half-precision sigmoid.

``TokenSet`` groups the levels of a job and is what the tokens artifact (``tokens.pt``) holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskd_core.checkpoint import atomic_save
from maskd_core.errors import SpecError

TOKENS_FORMAT = "maskd-tokens/1"


def _he_fan_out_(conv: nn.Conv2d) -> None:
    """Normal(0, sqrt(2 / (k*k*C_out))) weights and zero bias, the init of the official branch."""
    kh, kw = conv.kernel_size
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kh * kw * conv.out_channels)))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ReceptiveTokens(nn.Module):
    """The tokens of one level and, optionally, its per-image weighting over tokens."""

    def __init__(self, channels: int, num_tokens: int, weighting: bool) -> None:
        super().__init__()
        self.channels = channels
        self.num_tokens = num_tokens
        self.tokens = nn.Parameter(torch.randn(num_tokens, channels) * 0.01)
        self.weighting: nn.Sequential | None = None
        if weighting:
            # conv3x3 -> global average pool -> conv1x1, deliberately with no nonlinearity.
            self.weighting = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, num_tokens, 1),
            )
            for layer in self.weighting:
                if isinstance(layer, nn.Conv2d):
                    _he_fan_out_(layer)

    def masks(self, feature: torch.Tensor) -> torch.Tensor:
        """``sigmoid(E · F)`` as fp32 [N,T,H,W] from a feature [N,C,H,W]."""
        n, c, h, w = feature.shape
        with torch.autocast(feature.device.type, enabled=False):
            tokens = self.tokens.float().unsqueeze(0).expand(n, -1, -1)  # [N,T,C]
            logits = torch.bmm(tokens, feature.float().reshape(n, c, h * w))  # [N,T,HW]
            return torch.sigmoid(logits).reshape(n, self.num_tokens, h, w)

    def weights(self, feature: torch.Tensor) -> torch.Tensor | None:
        """Softmax over tokens of the weighting branch, fp32 [N,T]; None without the branch.

        The branch is linear up to the softmax, so GAP(conv3x3(F)) is computed in closed form:
        each of the nine kernel taps sees the feature summed over a window that drops at most
        one border row and column (the zero padding). That costs O(C·HW + 9·C²) instead of the
        O(9·C²·HW) of running the convolution, which would otherwise dominate a stage-2 step
        on small models; it is the same function, so the weights trained either way agree.
        """
        if self.weighting is None:
            return None
        conv3, _, conv1 = self.weighting
        assert isinstance(conv3, nn.Conv2d) and isinstance(conv1, nn.Conv2d)
        assert conv3.bias is not None and conv1.bias is not None
        with torch.autocast(feature.device.type, enabled=False):
            x = feature.float()
            h, w = x.shape[2:]
            rows = x.sum(dim=2)  # [N,C,W]
            # Kernel row i reads input rows shifted by i-1: tap 0 never sees the last row and
            # tap 2 never sees the first one; likewise for columns.
            by_row = torch.stack([rows - x[:, :, -1, :], rows, rows - x[:, :, 0, :]], dim=2)
            totals = by_row.sum(dim=3, keepdim=True)  # [N,C,3,1]
            window_sums = torch.cat(
                [totals - by_row[..., -1:], totals, totals - by_row[..., :1]], dim=3
            )  # [N,C,3,3]
            pooled = torch.einsum("ocij,ncij->no", conv3.weight.float(), window_sums) / (h * w)
            pooled = pooled + conv3.bias.float()
            logits = pooled @ conv1.weight.float().flatten(1).T + conv1.bias.float()
            return torch.softmax(logits, dim=1)

    def mask_feature(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: the feature times the combined mask, and the masks [N,T,H,W] (for Dice).

        With the weighting branch the combined mask is the convex combination Σ_t p_t M_t; without
        it (the official segmentation variant) the plain sum Σ_t M_t. Combining to [N,1,H,W]
        before multiplying avoids the [N,T,C,H,W] tensor the official code builds.
        """
        masks = self.masks(feature)
        weights = self.weights(feature)
        if weights is None:
            combined = masks.sum(dim=1, keepdim=True)
        else:
            combined = torch.einsum("nthw,nt->nhw", masks, weights).unsqueeze(1)
        return (feature.float() * combined).to(feature.dtype), masks


class TokenSet(nn.ModuleList):
    """``ReceptiveTokens`` for every distilled level of a job, in level order."""

    def __init__(self, channels: Sequence[int], num_tokens: int, weighting: bool) -> None:
        super().__init__(ReceptiveTokens(c, num_tokens, weighting) for c in channels)
        self.num_tokens = num_tokens
        self.weighting = weighting

    def level(self, index: int) -> ReceptiveTokens:
        module = self[index]
        assert isinstance(module, ReceptiveTokens)
        return module


def save_tokens(
    path: str | Path,
    tokens: TokenSet,
    levels: Sequence[Mapping[str, Any]],
    teacher: Mapping[str, Any],
) -> None:
    """Write the tokens artifact atomically; every value is readable with weights_only=True.

    ``levels`` holds ``{"teacher_layer", "level", "channels"}`` per level and ``teacher`` the
    ``{"arch", "args", "weights_sha256"}`` the tokens were learned on, so a later job can check
    it is reusing them on the same teacher.
    """
    atomic_save(
        {
            "format": TOKENS_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in tokens.state_dict().items()},
            "levels": [dict(level) for level in levels],
            "tokens": tokens.num_tokens,
            "mask_weighting": tokens.weighting,
            "teacher": dict(teacher),
        },
        path,
    )


def load_tokens(
    path: str | Path,
    levels: Sequence[Mapping[str, Any]],
    num_tokens: int,
    weighting: bool,
    teacher: Mapping[str, Any] | None = None,
) -> TokenSet:
    """Read a tokens artifact and check it fits the job (levels, channels, T, weighting, teacher).

    ``levels`` and ``teacher`` are what ``save_tokens`` would write for this job; a mismatch is a
    ``SpecError`` saying which part differs, since reusing masks learned on other features
    would silently distil the wrong thing.
    """
    field = "stage1"
    try:
        artifact = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecError(
            f"tokens file {str(path)!r} cannot be read ({type(exc).__name__}); delete it to "
            "learn the tokens again",
            field=field,
        ) from None
    if not isinstance(artifact, dict) or artifact.get("format") != TOKENS_FORMAT:
        raise SpecError(
            f"{str(path)!r} is not a {TOKENS_FORMAT} tokens artifact; delete it to learn the "
            "tokens again",
            field=field,
        )
    expected = [{k: level[k] for k in ("teacher_layer", "level", "channels")} for level in levels]
    found = [
        {k: level.get(k) for k in ("teacher_layer", "level", "channels")}
        for level in artifact["levels"]
    ]
    if found != expected:
        raise SpecError(
            f"tokens in {str(path)!r} were learned for levels {found}, but this job distils "
            f"{expected}; use the same teacher layers or learn new tokens",
            field="teacher.layers",
        )
    if artifact["tokens"] != num_tokens or artifact["mask_weighting"] != weighting:
        raise SpecError(
            f"tokens in {str(path)!r} have tokens={artifact['tokens']}, "
            f"mask_weighting={artifact['mask_weighting']}, but the job asks for "
            f"tokens={num_tokens}, mask_weighting={weighting}; match them or learn new tokens",
            field=field,
        )
    if teacher is not None:
        learned = artifact["teacher"]
        for key in ("arch", "weights_sha256"):
            if learned.get(key) != teacher.get(key):
                raise SpecError(
                    f"tokens in {str(path)!r} were learned on a teacher with {key}="
                    f"{learned.get(key)!r}, not {teacher.get(key)!r}; learn tokens for this "
                    "teacher",
                    field=f"teacher.{'weights' if key == 'weights_sha256' else key}",
                )
    token_set = TokenSet([level["channels"] for level in expected], num_tokens, weighting)
    token_set.load_state_dict(artifact["state_dict"])
    return token_set
