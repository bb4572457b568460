"""image_folder: Pascal VOC / Cityscapes style images and PNG masks written by the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskd_core.data import DATASETS, DenseDataset
from maskd_core.data.transforms import IGNORE_INDEX
from maskd_core.errors import DataError, SpecError


def build(**args: object) -> DenseDataset:
    return DATASETS.get("image_folder")(DATASETS.parse_args("image_folder", args), 0)


def write_pair(
    root: Path, name: str, mask: np.ndarray, image_size: tuple[int, int] | None = None
) -> None:
    height, width = image_size or mask.shape
    (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
    (root / "masks" / name).parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"{name}.jpg")
    palette_mask = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
    palette_mask.save(root / "masks" / f"{name}.png")


def test_reads_pairs_and_maps_the_ignore_value(tmp_path: Path) -> None:
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[1:3, 2:5] = 2
    mask[5, :] = 200
    write_pair(tmp_path, "a", mask)
    write_pair(tmp_path, "city/b", np.ones((6, 8), dtype=np.uint8))

    dataset = build(root=str(tmp_path), num_classes=3, ignore_index=200)
    assert len(dataset) == 2 and dataset.task == "segmentation"
    image, labels = dataset[0]
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    expected = torch.from_numpy(mask.astype(np.int64))
    expected[5, :] = IGNORE_INDEX
    assert torch.equal(labels, expected)
    assert torch.equal(dataset[1][1], torch.ones(6, 8, dtype=torch.int64))


def test_image_size_resizes_every_sample(tmp_path: Path) -> None:
    write_pair(tmp_path, "a", np.zeros((10, 20), dtype=np.uint8))
    image, labels = build(root=str(tmp_path), num_classes=2, image_size=[8, 12])[0]
    assert image.shape == (3, 8, 12) and labels.shape == (8, 12)


def test_missing_root_is_a_spec_error_naming_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(SpecError, match="nowhere") as caught:
        build(root=str(missing), num_classes=2)
    assert "images/<name>" in str(caught.value) and caught.value.field == "dataset.args.root"


def test_empty_folder_and_missing_masks_are_spec_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(SpecError, match="no images found"):
        build(root=str(tmp_path), num_classes=2)
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "lonely.png")
    with pytest.raises(SpecError, match=r"lonely\.png"):
        build(root=str(tmp_path), num_classes=2)


def test_class_beyond_num_classes_is_a_data_error_naming_the_mask(tmp_path: Path) -> None:
    write_pair(tmp_path, "bad", np.full((4, 4), 7, dtype=np.uint8))
    dataset = build(root=str(tmp_path), num_classes=3)
    with pytest.raises(DataError, match=r"bad\.png.*class 7"):
        dataset[0]


def test_mask_of_another_size_is_a_data_error(tmp_path: Path) -> None:
    write_pair(tmp_path, "odd", np.zeros((4, 4), dtype=np.uint8), image_size=(5, 4))
    with pytest.raises(DataError, match=r"odd\.png"):
        build(root=str(tmp_path), num_classes=2)[0]


def test_unreadable_image_is_a_data_error(tmp_path: Path) -> None:
    write_pair(tmp_path, "broken", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        build(root=str(tmp_path), num_classes=2)[0]


def test_ignore_index_inside_the_classes_is_refused() -> None:
    with pytest.raises(SpecError, match="ignore_index"):
        DATASETS.parse_args("image_folder", {"root": "x", "num_classes": 5, "ignore_index": 3})
