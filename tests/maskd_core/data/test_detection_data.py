"""Detection datasets: generated shapes, COCO and VOC files the tests write, and the flip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from maskd_core.data import DATASETS
from maskd_core.data.coco import MAX_ANNOTATION_FILE_BYTES
from maskd_core.data.detection_common import DetectionSample, hflip
from maskd_core.errors import DataError, SpecError
from maskd_core.loader import train_batches
from maskd_core.tasks import TASKS


def build(name: str, args: dict[str, Any], seed: int = 0) -> Any:
    return DATASETS.get(name)(DATASETS.parse_args(name, args), seed)


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 200, 30)).save(path)


# --- procedural boxes -------------------------------------------------------------------------


def test_procedural_boxes_are_deterministic_by_seed_and_index() -> None:
    first, again, other = (build("procedural_boxes", {}, seed) for seed in (3, 3, 4))
    assert first.task == "detection" and first.num_classes == 3 and len(first) == 512
    for field in ("image", "boxes", "labels"):
        assert torch.equal(getattr(first[5], field), getattr(again[5], field))
    assert first[5].ignore_boxes is None, "generated shapes have no ignore regions"
    assert not torch.equal(first[5].image, other[5].image)
    assert not torch.equal(first[5].image, first[6].image)


def test_procedural_boxes_are_the_tight_boxes_of_the_drawn_shapes() -> None:
    dataset = build(
        "procedural_boxes",
        {"num_classes": 5, "max_objects": 3, "max_object_size": 32, "num_samples": 20},
    )
    for index in range(len(dataset)):
        sample = dataset[index]
        image = sample.image
        assert image.dtype == torch.float32 and image.min() >= 0.0 and image.max() <= 1.0
        assert sample.labels.dtype == torch.int64 and len(sample.labels) >= 1
        assert set(sample.labels.tolist()) <= {1, 2, 3, 4, 5}
        background = image.flatten(1).median(dim=1).values
        # Shapes differ from the background by >= 0.25 on average; noise is 0.03.
        foreground = (image - background[:, None, None]).abs().mean(0) > 0.125
        for x1, y1, x2, y2 in sample.boxes.long().tolist():
            inside = foreground[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any(), "top/bottom rows must touch the shape"
            assert inside[:, 0].any() and inside[:, -1].any(), "left/right columns too"
            if y1 > 0:
                assert not foreground[y1 - 1, x1:x2].any(), "nothing just above the box"
            if x2 < image.shape[-1]:
                assert not foreground[y1:y2, x2].any(), "nothing just right of the box"


def test_procedural_boxes_vary_image_sizes_and_batch_as_lists() -> None:
    dataset = build(
        "procedural_boxes", {"vary_size": True, "image_size": 64, "max_object_size": 24}
    )
    sizes = {tuple(dataset[i].image.shape) for i in range(8)}
    assert len(sizes) > 1 and all(48 <= h <= 64 and 48 <= w <= 64 for _, h, w in sizes)
    task = TASKS.get("detection")()
    batch = next(train_batches(dataset, task, batch_size=4, seed=0))
    assert len(batch.images) == 4 and len(batch.targets) == 4
    assert {tuple(t) for t in (target.keys() for target in batch.targets)} == {("boxes", "labels")}


def test_procedural_boxes_args_refuse_objects_larger_than_the_image() -> None:
    with pytest.raises(SpecError, match="max_object_size"):
        DATASETS.parse_args("procedural_boxes", {"image_size": 32, "max_object_size": 48})


# --- augmentation -----------------------------------------------------------------------------


def test_hflip_mirrors_pixels_and_boxes_together() -> None:
    image = torch.zeros(3, 10, 20)
    image[:, 2:5, 3:7] = 1.0
    sample = DetectionSample(image, torch.tensor([[3.0, 2.0, 7.0, 5.0]]), torch.tensor([1]))
    flipped = hflip(sample)
    assert flipped.boxes.tolist() == [[13.0, 2.0, 17.0, 5.0]]
    assert flipped.image[:, 2:5, 13:17].eq(1.0).all() and flipped.image.sum() == image.sum()
    twice = hflip(flipped)
    assert torch.equal(twice.image, image) and torch.equal(twice.boxes, sample.boxes)


def test_augment_uses_only_the_given_generator() -> None:
    dataset = build("procedural_boxes", {"num_samples": 4})
    sample = dataset[0]
    outcomes = set()
    for seed in range(16):
        a = dataset.augment(sample, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        b = dataset.augment(sample, torch.Generator().manual_seed(seed))
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.image, b.image)
        outcomes.add(torch.equal(a.image, sample.image))
    assert outcomes == {True, False}, "some seeds flip, some do not"


# --- COCO -------------------------------------------------------------------------------------


def coco_files(tmp_path: Path, annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    images = tmp_path / "train2017"
    write_image(images / "a.jpg", 40, 30)
    write_image(images / "b.jpg", 20, 20)
    data = {
        "images": [
            {"id": 11, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 12, "file_name": "b.jpg", "width": 20, "height": 20},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [30, 20, 20, 20], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 40, 30], "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 7, "bbox": [5, 5, 0, 4], "iscrowd": 0},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return {"annotations": str(path), "images": str(images)}


def test_coco_maps_categories_skips_crowds_and_keeps_empty_images(tmp_path: Path) -> None:
    dataset = build("coco", coco_files(tmp_path))
    assert dataset.task == "detection" and dataset.num_classes == 2 and len(dataset) == 2
    first = dataset[0]
    assert first.image.shape == (3, 30, 40) and first.image.dtype == torch.float32
    # bbox xywh -> xyxy, clipped to the image; category 7 -> class 2 (ids sorted: 3, 7);
    # the crowd box and the zero-width box are dropped.
    assert first.boxes.tolist() == [[1.0, 2.0, 11.0, 7.0], [30.0, 20.0, 40.0, 30.0]]
    assert first.labels.tolist() == [2, 1]
    empty = dataset[1]
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    no_empty = build("coco", {**coco_files(tmp_path), "keep_empty_images": False})
    assert len(no_empty) == 1


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (
            {"id": 17, "image_id": 11, "category_id": 3, "bbox": [5.0, 5.0, -2.0, 4.0]},
            r"instances.json: annotation id 17 has bbox \[5.0, 5.0, -2.0, 4.0\] with negative "
            "width",
        ),
        (
            {"id": 18, "image_id": 99, "category_id": 3, "bbox": [1, 1, 2, 2]},
            "instances.json: annotation id 18 refers to image id 99",
        ),
        (
            {"id": 19, "image_id": 11, "category_id": 5, "bbox": [1, 1, 2, 2]},
            "instances.json: annotation id 19 has category_id 5",
        ),
        (
            {"id": 20, "image_id": 11, "category_id": 3, "bbox": [1, 1, 2]},
            r"instances.json: annotation id 20 has bbox \[1, 1, 2\]; expected",
        ),
    ],
)
def test_coco_malformed_annotation_names_the_file_and_entry(
    tmp_path: Path, annotation: dict[str, Any], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        build("coco", coco_files(tmp_path, [annotation]))


def test_coco_missing_paths_are_spec_errors_naming_the_path(tmp_path: Path) -> None:
    files = coco_files(tmp_path)
    with pytest.raises(SpecError, match=r"nowhere.json.*instances JSON"):
        build("coco", {**files, "annotations": str(tmp_path / "nowhere.json")})
    with pytest.raises(SpecError, match=r"val2017.*file_name"):
        build("coco", {**files, "images": str(tmp_path / "val2017")})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken.json: not a readable JSON"):
        build("coco", {**files, "annotations": str(tmp_path / "broken.json")})


def test_a_coco_annotation_file_past_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    files = coco_files(tmp_path)
    huge = tmp_path / "huge.json"
    with huge.open("wb") as sparse:  # no disk used: the size is all that is checked
        sparse.truncate(MAX_ANNOTATION_FILE_BYTES + 1)
    with pytest.raises(SpecError, match=r"huge.json.* larger than 1024 MiB") as refused:
        build("coco", {**files, "annotations": str(huge)})
    assert refused.value.field == "dataset.args.annotations"


def test_coco_missing_image_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    files = coco_files(tmp_path)
    (Path(files["images"]) / "b.jpg").unlink()
    dataset = build("coco", files)
    with pytest.raises(DataError, match=r"b\.jpg"):
        dataset[1]


# --- VOC --------------------------------------------------------------------------------------


def voc_xml(objects: str, filename: str = "000001.jpg") -> str:
    return (
        f"<annotation><filename>{filename}</filename>"
        "<size><width>50</width><height>40</height><depth>3</depth></size>"
        f"{objects}</annotation>"
    )


def voc_object(name: str, box: tuple[Any, ...], difficult: int = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
        f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
        "</bndbox></object>"
    )


def voc_root(tmp_path: Path, first_objects: str | None = None) -> Path:
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    objects = first_objects or (
        voc_object("dog", (1, 1, 10, 20))
        + voc_object("person", (20, 5, 60, 30))
        + voc_object("cat", (5, 5, 8, 8), difficult=1)
    )
    (root / "Annotations" / "000001.xml").write_text(voc_xml(objects))
    (root / "Annotations" / "000002.xml").write_text(voc_xml("", "000002.jpg"))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000002\n")
    write_image(root / "JPEGImages" / "000001.jpg", 50, 40)
    write_image(root / "JPEGImages" / "000002.jpg", 50, 40)
    return root


def test_voc_reads_boxes_classes_and_splits(tmp_path: Path) -> None:
    root = voc_root(tmp_path)
    dataset = build("voc", {"root": str(root)})
    assert dataset.num_classes == 20 and len(dataset) == 2
    sample = dataset[0]
    assert sample.image.shape == (3, 40, 50)
    # 1-based inclusive -> 0-based xyxy; the second box is clipped at the image's right edge;
    # the difficult cat is skipped.
    assert sample.boxes.tolist() == [[0.0, 0.0, 10.0, 20.0], [19.0, 4.0, 50.0, 30.0]]
    assert sample.labels.tolist() == [12, 15]  # dog, person in VOC order
    assert dataset[1].boxes.shape == (0, 4)
    assert len(build("voc", {"root": str(root), "split": "val"})) == 1
    assert len(build("voc", {"root": str(root), "split": None})) == 2


def test_voc_custom_classes_and_difficult_objects(tmp_path: Path) -> None:
    root = voc_root(tmp_path)
    dataset = build(
        "voc", {"root": str(root), "classes": ["cat", "dog", "person"], "difficult": "keep"}
    )
    assert dataset.num_classes == 3
    assert dataset[0].labels.tolist() == [2, 3, 1]


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        (voc_object("dragon", (1, 1, 5, 5)), "000001.xml: object 0 \\(dragon\\) has class"),
        (
            voc_object("dog", (1, 1, 5, 5)) + voc_object("cat", (9, 1, 5, 5)),
            "000001.xml: object 1 \\(cat\\) has box .* with negative width",
        ),
        (voc_object("dog", ("a", 1, 5, 5)), "000001.xml: object 0 \\(dog\\) needs a <bndbox>"),
        ("<object><name>dog", "000001.xml: not well-formed XML"),
    ],
)
def test_voc_malformed_annotation_names_the_file_and_object(
    tmp_path: Path, objects: str, message: str
) -> None:
    root = voc_root(tmp_path, objects)
    with pytest.raises(DataError, match=message):
        build("voc", {"root": str(root)})


def test_voc_missing_layout_is_a_spec_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nowhere.*Annotations"):
        build("voc", {"root": str(tmp_path / "nowhere")})
    root = voc_root(tmp_path)
    with pytest.raises(SpecError, match=r"test.txt"):
        build("voc", {"root": str(root), "split": "test"})
    with pytest.raises(SpecError, match="unique"):
        DATASETS.parse_args("voc", {"root": str(root), "classes": ["a", "a"]})


def test_voc_images_decode_like_pillow(tmp_path: Path) -> None:
    root = voc_root(tmp_path)
    image = build("voc", {"root": str(root)})[0].image
    expected = np.array(Image.open(root / "JPEGImages" / "000001.jpg").convert("RGB"))
    assert torch.allclose(image, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
