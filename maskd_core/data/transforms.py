"""Segmentation sample transforms: normalisation and generator-driven augmentation.

A segmentation sample is ``(image, mask)``: a normalised ``float32 [3, H, W]`` tensor and an
``int64 [H, W]`` tensor of class indices, with ``IGNORE_INDEX`` where no label applies.
Augmentations draw every random number from the generator they are given (never the global
RNG), which is what lets the loader reproduce any step's batch in any worker process.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator
from torch.nn import functional as F

SegmentationSample = tuple[torch.Tensor, torch.Tensor]

IGNORE_INDEX = 255
"""Mask value excluded from the loss and the metrics (Pascal VOC and Cityscapes use 255)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Map a ``[3, H, W]`` image in [0, 1] to ImageNet statistics.

    ImageNet statistics are used for every dataset so that weights from any torchvision
    backbone see the input they were trained on.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image - mean) / std


def resize_sample(sample: SegmentationSample, size: tuple[int, int]) -> SegmentationSample:
    """Resize to ``size`` (H, W): bilinear for the image, nearest for the mask (labels stay
    labels, never blends of two classes)."""
    image, mask = sample
    if tuple(image.shape[-2:]) == size:
        return sample
    resized_image = F.interpolate(
        image[None], size=size, mode="bilinear", align_corners=False, antialias=True
    )[0]
    resized_mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return resized_image, resized_mask.to(torch.int64)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, high: int) -> int:
    """An integer in ``[0, high]``."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def random_scale_crop_flip(
    sample: SegmentationSample,
    generator: torch.Generator,
    scale_range: tuple[float, float],
    hflip: bool = True,
    ignore_index: int = IGNORE_INDEX,
    crop_size: tuple[int, int] | None = None,
) -> SegmentationSample:
    """Rescale by a random factor, crop or pad to ``crop_size`` (H, W), then maybe flip.

    Without ``crop_size`` the output keeps the input's size, so augmented and plain samples
    batch together; with it every augmented sample has that size (Cityscapes' 512×1024 crops of
    1024×2048 images) whatever the image's. Padding fills the image with 0 (the mean colour
    after normalisation) and the mask with ``ignore_index``, so padded pixels never count as
    background.
    """
    image, mask = sample
    input_height, input_width = image.shape[-2:]
    height, width = (input_height, input_width) if crop_size is None else crop_size
    scale = _uniform(generator, *scale_range)
    scaled_size = (max(1, round(input_height * scale)), max(1, round(input_width * scale)))
    image, mask = resize_sample((image, mask), scaled_size)

    # A shrunk sample lands at a random place on the padded canvas, not always top-left.
    pad_height = max(0, height - scaled_size[0])
    pad_width = max(0, width - scaled_size[1])
    if pad_height or pad_width:
        pad_top = _randint(generator, pad_height)
        pad_left = _randint(generator, pad_width)
        padding = (pad_left, pad_width - pad_left, pad_top, pad_height - pad_top)
        image = F.pad(image, padding, value=0.0)
        mask = F.pad(mask, padding, value=ignore_index)

    top = _randint(generator, image.shape[-2] - height)
    left = _randint(generator, image.shape[-1] - width)
    image = image[:, top : top + height, left : left + width]
    mask = mask[top : top + height, left : left + width]

    if hflip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.flip(-1)
        mask = mask.flip(-1)
    return image.contiguous(), mask.contiguous()


def _check_scale_range(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0.0 < low <= high:
        raise ValueError(f"needs 0 < low <= high, got ({low}, {high})")
    return value


ScaleRange = Annotated[tuple[float, float], AfterValidator(_check_scale_range)]
"""``(low, high)`` factors of the random rescale, as an argument-model field type."""
