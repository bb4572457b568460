"""Scale/crop/flip keeps labels labels and pads with the ignore index."""

from __future__ import annotations

import torch

from maskd_core.data.transforms import IGNORE_INDEX, random_scale_crop_flip, resize_sample


def test_resize_keeps_mask_values_and_shape() -> None:
    image = torch.rand(3, 8, 8)
    mask = torch.arange(64).view(8, 8) % 3
    resized_image, resized_mask = resize_sample((image, mask), (16, 12))
    assert resized_image.shape == (3, 16, 12) and resized_mask.shape == (16, 12)
    assert resized_mask.dtype == torch.int64
    assert set(resized_mask.unique().tolist()) <= {0, 1, 2}


def test_shrinking_pads_the_mask_with_ignore_and_the_image_with_zero() -> None:
    image = torch.ones(3, 32, 32)
    mask = torch.ones(32, 32, dtype=torch.int64)
    out_image, out_mask = random_scale_crop_flip(
        (image, mask), torch.Generator().manual_seed(0), scale_range=(0.5, 0.5)
    )
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    assert int((out_mask == 1).sum()) == 16 * 16
    assert int((out_mask == IGNORE_INDEX).sum()) == 32 * 32 - 16 * 16
    assert bool((out_image[:, out_mask == IGNORE_INDEX] == 0).all())


def test_flip_moves_image_and_mask_together() -> None:
    image = torch.zeros(3, 4, 6)
    image[:, :, 0] = 1.0
    mask = torch.zeros(4, 6, dtype=torch.int64)
    mask[:, 0] = 2
    flips = 0
    for seed in range(20):
        out_image, out_mask = random_scale_crop_flip(
            (image, mask), torch.Generator().manual_seed(seed), scale_range=(1.0, 1.0)
        )
        assert torch.equal(out_mask == 2, out_image[0] == 1.0)
        flips += int(out_mask[0, -1] == 2)
    assert 0 < flips < 20
