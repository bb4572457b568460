"""One picture per level of what the receptive tokens learned: the input and every token's mask.

A person judging stage 1 wants to see the tokens side by side on the same image (do they
cover different parts of it? does any cover nothing?) next to the masked-teacher check, not one
image per token scattered over as many cards. ``mask_grid`` lays them out in a labelled grid:
the input first, then each token's mask as a heat overlay on a grey copy of the input, each
captioned with the share of the image the mask keeps. Plain numpy and PIL, no torch, so the
layout is tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL_SIZE = 128
"""Pixels of a cell's longer side: small inputs are enlarged so a 32-pixel mask is readable."""
MAX_COLUMNS = 6
GAP = 6
FONT_SIZE = 12
LINE_HEIGHT = 16
OVERLAY_STRENGTH = 0.75
"""How much of a masked pixel's colour is the heat colour rather than the grey input."""

_HEAT_STOPS = np.array(
    [[0, 0, 64], [32, 64, 255], [0, 220, 200], [255, 230, 0], [255, 40, 0]], dtype=np.float64
)
"""Dark blue (mask 0) through cyan and yellow to red (mask 1): readable without a legend."""


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] (any shape) as RGB floats in [0, 255], shape ``values.shape + (3,)``."""
    position = np.clip(values, 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    low = np.minimum(position.astype(np.int64), len(_HEAT_STOPS) - 2)
    fraction = (position - low)[..., None]
    colours: np.ndarray = _HEAT_STOPS[low] * (1 - fraction) + _HEAT_STOPS[low + 1] * fraction
    return colours


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask`` (HxW in [0, 1]) as a heat colour over a grey ``image`` (HxWx3 uint8).

    Grey, so the colour is the mask's alone; weighted by the mask, so where it is 0 the input
    still shows through and the eye can tell what the token looks at.
    """
    grey = image.astype(np.float64).mean(axis=2, keepdims=True).repeat(3, axis=2)
    weight = OVERLAY_STRENGTH * np.clip(mask, 0.0, 1.0)[..., None]
    blended = grey * (1 - weight) + heat_colours(mask) * weight
    pixels: np.ndarray = np.clip(blended.round(), 0, 255).astype(np.uint8)
    return pixels


def _cell_shape(height: int, width: int, cell_size: int) -> tuple[int, int]:
    scale = cell_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def mask_grid(
    image: np.ndarray,
    masks: np.ndarray,
    title: Sequence[str],
    *,
    cell_size: int = CELL_SIZE,
    max_columns: int = MAX_COLUMNS,
) -> np.ndarray:
    """The input and each token's mask in one labelled RGB image (uint8, HxWx3).

    ``image`` is HxWx3 uint8; ``masks`` is TxHxW in [0, 1] at the image's size (one mask per
    token); ``title`` the lines written above the grid (the level, the masked-teacher check).
    Cells read left to right: ``input``, then ``token t  NN%``, NN the mask's mean, i.e. the
    share of the feature the token lets through.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {image.shape} {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks must be TxHxW at the image's size {image.shape[:2]}, got {masks.shape}"
        )
    cells = [("input", image)]
    for token, mask in enumerate(masks):
        cells.append((f"token {token}  {float(mask.mean()):.0%}", mask_overlay(image, mask)))
    cell_height, cell_width = _cell_shape(image.shape[0], image.shape[1], cell_size)
    columns = min(len(cells), max_columns)
    rows = -(-len(cells) // columns)
    font = ImageFont.load_default(size=FONT_SIZE)
    header = LINE_HEIGHT * len(title) + GAP
    grid_width = columns * cell_width + (columns + 1) * GAP
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_width = max((measure.textlength(line, font=font) for line in title), default=0.0)
    width = max(grid_width, int(title_width) + 2 * GAP)
    row_height = cell_height + LINE_HEIGHT + GAP
    canvas = Image.new("RGB", (width, header + rows * row_height + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for line_number, line in enumerate(title):
        draw.text((GAP, GAP + line_number * LINE_HEIGHT), line, fill="black", font=font)
    for index, (label, pixels) in enumerate(cells):
        row, column = divmod(index, columns)
        left = GAP + column * (cell_width + GAP)
        top = header + GAP + row * row_height
        picture = Image.fromarray(pixels).resize(
            (cell_width, cell_height), Image.Resampling.NEAREST
        )
        canvas.paste(picture, (left, top))
        draw.text((left, top + cell_height + 2), label, fill="black", font=font)
    return np.asarray(canvas)
