"""``crop_size``: augmented training samples are cut to one size, validation samples stay whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskd_core.data.folder import ImageFolder, ImageFolderArgs
from maskd_core.data.transforms import IGNORE_INDEX, random_scale_crop_flip


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_every_scale_is_cut_or_padded_to_the_crop(scale: float) -> None:
    image = torch.ones(3, 32, 64)
    mask = torch.ones(32, 64, dtype=torch.int64)
    out_image, out_mask = random_scale_crop_flip(
        (image, mask),
        torch.Generator().manual_seed(0),
        scale_range=(scale, scale),
        crop_size=(16, 24),
    )
    assert out_image.shape == (3, 16, 24) and out_mask.shape == (16, 24)
    # Half size (16×32) still covers a 16×24 crop; nothing is padded at any of these scales.
    assert int((out_mask == IGNORE_INDEX).sum()) == 0


def test_a_crop_larger_than_the_rescaled_image_pads_with_ignore() -> None:
    image = torch.ones(3, 8, 8)
    mask = torch.ones(8, 8, dtype=torch.int64)
    _, out_mask = random_scale_crop_flip(
        (image, mask), torch.Generator().manual_seed(0), scale_range=(1.0, 1.0), crop_size=(8, 12)
    )
    assert out_mask.shape == (8, 12)
    assert int((out_mask == 1).sum()) == 64
    assert int((out_mask == IGNORE_INDEX).sum()) == 8 * 4


def test_an_image_folder_crops_only_what_it_augments(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (64, 32)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.ones((32, 64), dtype=np.uint8)).save(tmp_path / "masks" / "a.png")
    folder = ImageFolder(
        ImageFolderArgs(root=str(tmp_path), num_classes=3, crop_size=(16, 32), scale_range=(1, 1))
    )
    whole = folder[0]
    assert whole[0].shape == (3, 32, 64)
    cropped_image, cropped_mask = folder.augment(whole, torch.Generator().manual_seed(1))
    assert cropped_image.shape == (3, 16, 32) and cropped_mask.shape == (16, 32)


def test_crop_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        ImageFolderArgs(root="data", num_classes=3, crop_size=(0, 32))
