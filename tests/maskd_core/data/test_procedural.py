"""procedural_shapes: seeded, lazily generated, and labelled exactly."""

from __future__ import annotations

import math

import pytest
import torch

from maskd_core.data import DATASETS, DenseDataset
from maskd_core.data.procedural import MAX_CLASSES, class_appearance, shape_mask
from maskd_core.data.transforms import IGNORE_INDEX
from maskd_core.errors import SpecError


def build(seed: int = 0, **args: object) -> DenseDataset:
    return DATASETS.get("procedural_shapes")(DATASETS.parse_args("procedural_shapes", args), seed)


def test_samples_have_the_segmentation_format() -> None:
    dataset = build(num_samples=10, image_size=48, num_classes=5)
    image, mask = dataset[3]
    assert dataset.task == "segmentation"
    assert len(dataset) == 10
    assert image.dtype == torch.float32 and image.shape == (3, 48, 48)
    assert mask.dtype == torch.int64 and mask.shape == (48, 48)
    assert int(mask.min()) >= 0 and int(mask.max()) < 5


def test_same_seed_same_samples_and_other_seeds_differ() -> None:
    first, again, other = build(seed=1), build(seed=1), build(seed=2)
    for index in (0, 7):
        assert torch.equal(first[index][0], again[index][0])
        assert torch.equal(first[index][1], again[index][1])
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], first[1][0])


def test_data_seed_overrides_the_job_seed() -> None:
    assert torch.equal(build(seed=1, data_seed=9)[0][0], build(seed=2, data_seed=9)[0][0])


def test_huge_datasets_cost_nothing_until_read() -> None:
    dataset = build(num_samples=1_000_000_000)
    assert dataset[999_999_999][1].shape == (64, 64)
    with pytest.raises(IndexError):
        dataset[1_000_000_000]


def test_every_class_appears() -> None:
    dataset = build(num_samples=40, num_classes=7)
    seen = set()
    for index in range(len(dataset)):
        seen.update(dataset[index][1].unique().tolist())
    assert seen == set(range(7))


def test_disc_and_rectangle_masks_follow_their_formulas() -> None:
    disc = shape_mask("disc", (20, 30), centre=(10.0, 8.0), radius=5.0, angle=0.3)
    ys, xs = torch.meshgrid(torch.arange(20) + 0.5, torch.arange(30) + 0.5, indexing="ij")
    assert torch.equal(disc, (xs - 10) ** 2 + (ys - 8) ** 2 <= 25)

    upright = shape_mask("rectangle", (20, 20), centre=(10.0, 10.0), radius=6.0, angle=0.0)
    assert torch.equal(upright, ((xs[:, :20] - 10).abs() <= 6) & ((ys[:, :20] - 10).abs() <= 3.3))
    turned = shape_mask("rectangle", (20, 20), centre=(10.0, 10.0), radius=6.0, angle=math.pi / 2)
    assert torch.equal(turned, upright.T)


def test_ring_has_a_hole_and_half_disc_half_a_disc() -> None:
    ring = shape_mask("ring", (21, 21), centre=(10.5, 10.5), radius=8.0, angle=0.0)
    assert not ring[10, 10] and ring[10, 3]
    half = shape_mask("half_disc", (21, 21), centre=(10.5, 10.5), radius=8.0, angle=0.0)
    disc = shape_mask("disc", (21, 21), centre=(10.5, 10.5), radius=8.0, angle=0.0)
    assert bool((half <= disc).all()) and half[15, 10] and not half[5, 10]


def test_all_class_appearances_are_distinct() -> None:
    appearances = {class_appearance(c) for c in range(1, MAX_CLASSES)}
    assert len(appearances) == MAX_CLASSES - 1


def test_too_many_classes_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="num_classes"):
        DATASETS.parse_args("procedural_shapes", {"num_classes": MAX_CLASSES + 1})


def test_augment_uses_only_its_generator() -> None:
    dataset = build(scale_range=(0.5, 2.0))
    sample = dataset[0]
    torch.manual_seed(0)
    first = dataset.augment(sample, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    again = dataset.augment(sample, torch.Generator().manual_seed(5))
    other = dataset.augment(sample, torch.Generator().manual_seed(6))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == sample[0].shape and first[1].shape == sample[1].shape
    assert set(first[1].unique().tolist()) <= set(range(5)) | {IGNORE_INDEX}
