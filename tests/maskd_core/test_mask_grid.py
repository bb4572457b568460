"""The mask grid: one labelled picture per level, the input first and then every token's mask."""

from __future__ import annotations

import numpy as np
import pytest

from maskd_core.mask_grid import GAP, LINE_HEIGHT, heat_colours, mask_grid, mask_overlay


def _image(height: int = 32, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_heat_colours_run_from_dark_blue_to_red() -> None:
    colours = heat_colours(np.array([0.0, 1.0, -1.0, 2.0]))
    np.testing.assert_allclose(colours[0], [0, 0, 64])
    np.testing.assert_allclose(colours[1], [255, 40, 0])
    np.testing.assert_allclose(colours[2], colours[0])  # clipped into [0, 1]
    np.testing.assert_allclose(colours[3], colours[1])


def test_an_overlay_keeps_the_grey_input_where_the_mask_is_zero() -> None:
    image = _image()
    mask = np.zeros((32, 32))
    mask[:, 16:] = 1.0
    overlay = mask_overlay(image, mask)
    grey = image.astype(np.float64).mean(axis=2).round()
    np.testing.assert_array_equal(overlay[:, :16, 0], grey[:, :16])
    np.testing.assert_array_equal(overlay[:, :16, 0], overlay[:, :16, 2])
    # Where the mask is 1 the pixel leans to the heat colour's red.
    assert (overlay[:, 16:, 0].astype(int) - overlay[:, 16:, 2].astype(int)).mean() > 100


def test_the_grid_lays_out_the_input_then_each_token_under_the_title() -> None:
    image = np.full((32, 32, 3), 200, np.uint8)
    masks = np.stack([np.zeros((32, 32)), np.ones((32, 32)), np.full((32, 32), 0.5)])
    grid = mask_grid(image, masks, ["level 0", "masked teacher miou 0.500 (teacher 0.600)"])

    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    cell = 128  # 32-pixel images are enlarged to the cell size
    top = 2 * LINE_HEIGHT + GAP + GAP
    lefts = [GAP + column * (cell + GAP) for column in range(4)]
    assert grid.shape[1] >= lefts[-1] + cell + GAP
    centre = top + cell // 2

    def at(column: int) -> np.ndarray:
        return grid[centre, lefts[column] + cell // 2]

    np.testing.assert_array_equal(at(0), [200, 200, 200])  # the input as it is
    np.testing.assert_array_equal(at(1), mask_overlay(image[:1, :1], masks[0][:1, :1])[0, 0])
    np.testing.assert_array_equal(at(2), mask_overlay(image[:1, :1], masks[1][:1, :1])[0, 0])
    np.testing.assert_array_equal(at(3), mask_overlay(image[:1, :1], masks[2][:1, :1])[0, 0])
    # The title band and the captions are written in black on white.
    assert (grid[: top - GAP].min(axis=2) < 100).any()
    caption = grid[top + cell : top + cell + LINE_HEIGHT, lefts[1] : lefts[1] + cell]
    assert (caption.min(axis=2) < 100).any()


def test_many_tokens_wrap_onto_rows() -> None:
    masks = np.random.default_rng(1).random((8, 16, 24))
    grid = mask_grid(_image(16, 24), masks, ["level 1"], cell_size=48, max_columns=3)
    # 9 cells in rows of 3; a 16x24 input fills 32x48 cells.
    row_height = 32 + LINE_HEIGHT + GAP
    assert grid.shape[0] == LINE_HEIGHT + GAP + 3 * row_height + GAP
    assert grid.shape[1] == 3 * 48 + 4 * GAP


def test_a_long_title_widens_the_picture() -> None:
    title = ["masked teacher " + "miou " * 40]
    grid = mask_grid(_image(), np.zeros((1, 32, 32)), title, cell_size=32)
    assert grid.shape[1] > 2 * 32 + 3 * GAP


@pytest.mark.parametrize(
    ("image", "masks"),
    [
        (np.zeros((32, 32), np.uint8), np.zeros((1, 32, 32))),
        (np.zeros((32, 32, 3), np.float32), np.zeros((1, 32, 32))),
        (np.zeros((32, 32, 3), np.uint8), np.zeros((1, 16, 16))),
    ],
)
def test_inputs_of_the_wrong_shape_are_refused(image: np.ndarray, masks: np.ndarray) -> None:
    with pytest.raises(ValueError, match="must be"):
        mask_grid(image, masks, ["x"])
