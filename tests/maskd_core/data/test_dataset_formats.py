"""Users' own data in each format, with its own train/val split, written small by the tests.

- VOC: split files of any name, class names read from the annotations, renamed, merged or
  dropped, difficult objects as ignore regions;
- COCO: a separate val file, the user's category ids, crowd regions left out of evaluation;
- image folders: train/ and val/ sub-folders, nested Cityscapes-style names, palette, 16-bit and
  greyscale files side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from maskd_core.data import DATASETS, build_dataset, check_same_classes
from maskd_core.data.transforms import IGNORE_INDEX, normalize
from maskd_core.errors import DataError, SpecError
from maskd_core.loader import train_val_split
from maskd_core.spec import JobSpec
from maskd_core.tasks import TASKS
from maskd_core.tasks.detection import coco_map
from maskd_core.validate import validate_job


def build(name: str, args: dict[str, Any], prefix: str = "dataset.args") -> Any:
    return DATASETS.get(name)(DATASETS.parse_args(name, args), 0, prefix=prefix)


def write_image(path: Path, width: int, height: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), 90).save(path)


def detection_job(dataset: dict[str, Any], val: dict[str, Any]) -> JobSpec:
    tiny = {"backbone": "tiny", "tiny_width": 8, "fpn_channels": 32, "min_size": 64, "max_size": 64}
    return JobSpec.model_validate(
        {
            "task": "detection",
            "device": "cpu",
            "teacher": {"arch": "fcos", "args": tiny, "layers": ["backbone"]},
            "student": {"arch": "fcos", "args": tiny, "layers": ["backbone"]},
            "dataset": dataset,
            "val_dataset": val,
        }
    )


# --- VOC --------------------------------------------------------------------------------------


def voc_object(name: str, box: tuple[int, int, int, int], difficult: int = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
        f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
        "</bndbox></object>"
    )


def forest(tmp_path: Path) -> Path:
    """A VOC-layout set of trees, its own split files named train_2024 and val_2024."""
    root = tmp_path / "forest"
    objects = {
        "a": voc_object("Dead", (1, 1, 10, 10)) + voc_object("Alive", (12, 12, 30, 30)),
        "b": voc_object("Alive", (2, 2, 20, 20)) + voc_object("Stump", (1, 20, 8, 28)),
        "c": voc_object("Rock", (5, 5, 15, 15)) + voc_object("Dead", (20, 1, 30, 9), difficult=1),
    }
    (root / "Annotations").mkdir(parents=True)
    for stem, found in objects.items():
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>"
            f"<size><width>32</width><height>32</height></size>{found}</annotation>"
        )
        write_image(root / "JPEGImages" / f"{stem}.jpg", 32, 32)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train_2024.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val_2024.txt").write_text("c\n")
    (root / "lists").mkdir()
    (root / "lists" / "Dead_val.txt").write_text("c  1\na -1\n")
    return root


def test_voc_reads_class_names_from_the_annotations_and_any_split_file(tmp_path: Path) -> None:
    root = forest(tmp_path)
    train = build("voc", {"root": str(root), "split": "train_2024", "classes": "annotations"})
    assert train.class_names == {1: "Alive", 2: "Dead", 3: "Rock", 4: "Stump"}
    assert len(train) == 2 and train[0].labels.tolist() == [2, 1]
    val = build("voc", {"root": str(root), "split": "val_2024", "classes": "annotations"})
    assert val.class_names == train.class_names, "names come from the whole folder"
    check_same_classes(train, val)
    listed = build(
        "voc", {"root": str(root), "split_file": "lists/Dead_val.txt", "classes": "annotations"}
    )
    assert [sample.file_name for sample in listed.samples] == ["c.jpg", "a.jpg"]


def test_voc_class_map_merges_renames_and_drops(tmp_path: Path) -> None:
    root = forest(tmp_path)
    args = {
        "root": str(root),
        "split": "train_2024",
        "classes": ["Tree", "Stump"],
        "class_map": {"Dead": "Tree", "Alive": "Tree", "Rock": None},
    }
    dataset = build("voc", args)
    assert dataset.num_classes == 2 and dataset.class_names == {1: "Tree", 2: "Stump"}
    assert dataset[0].labels.tolist() == [1, 1] and dataset[1].labels.tolist() == [1, 2]
    val = build("voc", {**args, "split": "val_2024"})
    assert val[0].boxes.shape == (0, 4), "the rock is dropped, the dead tree is difficult"
    with pytest.raises(DataError, match=r"'Stump', which is not one of .* class_map"):
        build("voc", {**args, "classes": ["Tree"]})
    assert build("voc", {**args, "classes": "annotations"}).class_names == {1: "Stump", 2: "Tree"}


def test_voc_difficult_objects_are_ignore_regions_by_default(tmp_path: Path) -> None:
    root = forest(tmp_path)
    args = {"root": str(root), "split": "val_2024", "classes": "annotations"}
    sample = build("voc", args)[0]
    assert sample.labels.tolist() == [3]
    assert sample.ignore_boxes is not None and sample.ignore_labels is not None
    assert sample.ignore_boxes.tolist() == [[19.0, 0.0, 30.0, 9.0]]
    assert sample.ignore_labels.tolist() == [2]
    assert build("voc", {**args, "difficult": "skip"})[0].ignore_boxes is None
    assert build("voc", {**args, "difficult": "keep"})[0].labels.tolist() == [3, 2]


def test_voc_the_20_names_stay_the_default_preset(tmp_path: Path) -> None:
    root = forest(tmp_path)
    plants = {"Dead": "pottedplant", "Alive": "pottedplant", "Stump": "pottedplant", "Rock": None}
    dataset = build("voc", {"root": str(root), "split": None, "class_map": plants})
    assert dataset.num_classes == 20 and dataset.class_names[15] == "person"
    assert dataset[0].labels.tolist() == [16, 16]
    with pytest.raises(DataError, match="class 'Dead', which is not one of"):
        build("voc", {"root": str(root), "split": "train_2024"})


def test_voc_split_settings_and_errors_name_the_val_field(tmp_path: Path) -> None:
    root = forest(tmp_path)
    with pytest.raises(SpecError, match="not both"):
        DATASETS.parse_args("voc", {"root": str(root), "split": "val", "split_file": "x.txt"})
    with pytest.raises(SpecError, match=r"'ImageSets/Main/test\.txt' does not exist") as missing:
        build("voc", {"root": str(root), "split": "test"}, prefix="val_dataset.args")
    assert missing.value.field == "val_dataset.args.split"
    with pytest.raises(SpecError, match=r"'lists/none\.txt'") as missing:
        build("voc", {"root": str(root), "split_file": "lists/none.txt"}, "val_dataset.args")
    assert missing.value.field == "val_dataset.args.split_file"
    with pytest.raises(SpecError, match="must stay inside"):
        DATASETS.parse_args("voc", {"root": str(root), "split_file": "../secret.txt"})


def test_voc_val_split_in_a_job_and_an_empty_one_refused(tmp_path: Path) -> None:
    root = forest(tmp_path)
    common = {"root": str(root), "classes": "annotations"}
    dataset = {"name": "voc", "args": {**common, "split": "train_2024"}}
    spec = detection_job(dataset, {"args": {**common, "split": "val_2024"}})
    train, val = train_val_split(spec, build_dataset(spec))
    assert (len(train), len(val)) == (2, 1)
    (root / "ImageSets" / "Main" / "empty.txt").write_text("")
    empty = detection_job(dataset, {"args": {**common, "split": "empty"}})
    with pytest.raises(SpecError, match="holds no samples") as refused:
        train_val_split(empty, build_dataset(empty))
    assert refused.value.field == "val_dataset.args"
    fewer = {"classes": ["Alive", "Dead", "Rock"], "class_map": {"Stump": None}}
    other = detection_job(dataset, {"args": {**common, "split": "val_2024", **fewer}})
    with pytest.raises(SpecError, match="3 classes but dataset has 4"):
        train_val_split(other, build_dataset(other))


# --- COCO -------------------------------------------------------------------------------------


def coco_split(tmp_path: Path, split: str, annotations: list[dict[str, Any]]) -> dict[str, str]:
    images = tmp_path / split
    write_image(images / "x.jpg", 40, 40)
    write_image(images / "y.jpg", 40, 40, mode="L")  # greyscale beside colour
    data = {
        "images": [
            {"id": 1, "file_name": "x.jpg", "width": 40, "height": 40},
            {"id": 2, "file_name": "y.jpg", "width": 40, "height": 40},
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}],
        "annotations": annotations,
    }
    path = tmp_path / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return {"annotations": str(path), "images": str(images)}


def box(ann_id: int, image: int, category: int, bbox: list[int], crowd: int = 0) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image,
        "category_id": category,
        "bbox": bbox,
        "iscrowd": crowd,
    }


def test_coco_separate_val_file_with_crowds_as_ignore_regions(tmp_path: Path) -> None:
    train = coco_split(tmp_path, "train2017", [box(1, 1, 1, [0, 0, 10, 10])])
    val = coco_split(
        tmp_path,
        "val2017",
        [box(5, 1, 90, [2, 2, 8, 8]), box(6, 2, 1, [0, 0, 40, 20], crowd=1)],
    )
    spec = detection_job({"name": "coco", "args": train}, {"args": val})
    train_data, val_data = train_val_split(spec, build_dataset(spec))
    assert train_data.class_names == val_data.class_names == {1: "person", 2: "toothbrush"}
    crowded = val_data[1]
    assert crowded.boxes.shape == (0, 4) and crowded.image.shape == (3, 40, 40)
    assert crowded.ignore_boxes is not None and crowded.ignore_labels is not None
    assert crowded.ignore_boxes.tolist() == [[0.0, 0.0, 40.0, 20.0]]
    assert crowded.ignore_labels.tolist() == [1]
    batch = TASKS.get("detection")().collate([val_data[0], crowded])
    assert batch.targets[1]["boxes"].shape == (0, 4), "crowds are never training targets"
    assert batch.ignore is not None and batch.ignore[0]["boxes"].shape == (0, 4)
    assert build("coco", {**val, "crowd": "skip"})[1].ignore_boxes is None
    validate_job(spec)  # the dry run reads both files


def test_coco_keeps_the_users_category_ids_when_asked(tmp_path: Path) -> None:
    files = coco_split(tmp_path, "train2017", [box(1, 1, 90, [0, 0, 10, 10])])
    contiguous = build("coco", files)
    assert contiguous.num_classes == 2 and contiguous[0].labels.tolist() == [2]
    original = build("coco", {**files, "category_ids": "original"})
    assert original.num_classes == 90 and original[0].labels.tolist() == [90]
    assert original.class_names == {1: "person", 90: "toothbrush"}


def test_coco_val_file_with_other_categories_is_refused(tmp_path: Path) -> None:
    train = coco_split(tmp_path, "train2017", [])
    val = coco_split(tmp_path, "val2017", [])
    data = json.loads(Path(val["annotations"]).read_text())
    data["categories"] = [{"id": 1, "name": "person"}, {"id": 90, "name": "hairbrush"}]
    Path(val["annotations"]).write_text(json.dumps(data))
    spec = detection_job({"name": "coco", "args": train}, {"args": val})
    with pytest.raises(SpecError, match="class 2 is 'hairbrush' in val_dataset") as refused:
        validate_job(spec)
    assert refused.value.field == "val_dataset.args"


def test_coco_original_ids_must_be_usable_class_ids(tmp_path: Path) -> None:
    files = coco_split(tmp_path, "train2017", [])
    data = json.loads(Path(files["annotations"]).read_text())
    data["categories"] = [{"id": 0, "name": "zero"}]
    Path(files["annotations"]).write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"1\.\.\.4096 \(0 is the background\)") as refused:
        build("coco", {**files, "category_ids": "original"}, prefix="val_dataset.args")
    assert refused.value.field == "val_dataset.args.category_ids"


def test_coco_map_leaves_detections_on_crowds_out() -> None:
    def targets(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }

    truth = [targets([[0, 0, 10, 10]], [1])]
    found = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 60.0, 60.0]]),
        "scores": torch.tensor([0.5, 0.9]),
        "labels": torch.tensor([1, 1]),
    }
    without = coco_map(truth, [found], [(64, 64)])
    crowd = [targets([[25, 25, 64, 64]], [1])]
    with_crowd = coco_map(truth, [found], [(64, 64)], crowd)
    assert without["map"] < 1.0 and with_crowd["map"] == pytest.approx(1.0)
    other_class = coco_map(truth, [found], [(64, 64)], [targets([[25, 25, 64, 64]], [2])])
    assert other_class["map"] == pytest.approx(without["map"]), "a crowd ignores its class only"
    assert coco_map([targets([], [])], [found], [(64, 64)], crowd)["map"] == 0.0


# --- image folders ----------------------------------------------------------------------------


def cityscapes(tmp_path: Path) -> Path:
    """Cityscapes' layout: nested city folders, suffixed names, a 255 ignore value, and images
    that mix RGB, 8-bit and 16-bit greyscale files."""
    root = tmp_path / "cityscapes"
    labels = np.zeros((8, 12), dtype=np.uint8)
    labels[2:6, 3:9] = 2
    labels[0, :] = 255
    for split, city, frame, mode in (
        ("train", "aachen", "000000", "RGB"),
        ("train", "bremen", "000001", "L"),
        ("val", "lindau", "000002", "I;16"),
    ):
        stem = f"{city}_{frame}"
        image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        if mode == "I;16":
            Image.fromarray(np.full((8, 12), 65535, dtype=np.uint16)).save(image)
        else:
            Image.new(mode, (12, 8), 128 if mode == "L" else (128, 128, 128)).save(image)
        mask = root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(mask)
        (mask.parent / f"{stem}_gtFine_color.png").write_bytes(b"not a mask")
    return root


def cityscapes_args(root: Path, split: str) -> dict[str, Any]:
    return {
        "root": str(root),
        "num_classes": 19,
        "images_dir": f"leftImg8bit/{split}",
        "masks_dir": f"gtFine/{split}",
        "image_suffix": "_leftImg8bit",
        "mask_suffix": "_gtFine_labelTrainIds",
    }


def test_image_folder_nested_suffixed_train_and_val(tmp_path: Path) -> None:
    root = cityscapes(tmp_path)
    train = build("image_folder", cityscapes_args(root, "train"))
    val = build("image_folder", cityscapes_args(root, "val"))
    assert (len(train), len(val)) == (2, 1)
    colour, grey = train[0][0], train[1][0]
    assert colour.shape == grey.shape == (3, 8, 12)
    assert torch.allclose(colour, grey), "a greyscale image reads as the same grey in RGB"
    white = normalize(torch.ones(3, 8, 12))
    assert torch.allclose(val[0][0], white), "16-bit white stays white, not clipped"
    labels = val[0][1]
    assert labels[0].eq(IGNORE_INDEX).all() and labels[3, 4] == 2 and labels[7, 0] == 0


def test_image_folder_suffix_errors_say_the_layout(tmp_path: Path) -> None:
    root = cityscapes(tmp_path)
    args = {**cityscapes_args(root, "train"), "image_suffix": "_rightImg8bit"}
    with pytest.raises(SpecError, match="no images whose name ends in '_rightImg8bit'") as error:
        build("image_folder", args, prefix="val_dataset.args")
    assert error.value.field == "val_dataset.args.root"
    with pytest.raises(SpecError, match=r"2 of 2 images have no mask.*_gtFine_labelIds\.png"):
        build("image_folder", {**cityscapes_args(root, "train"), "mask_suffix": "_gtFine_labelIds"})
    with pytest.raises(SpecError, match="mask_suffix"):
        DATASETS.parse_args("image_folder", {**args, "mask_suffix": "/../x"})


def test_image_folder_palette_and_16_bit_masks_with_their_ignore_value(tmp_path: Path) -> None:
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    write_image(tmp_path / "images" / "palette.jpg", 4, 2)
    write_image(tmp_path / "images" / "deep.png", 4, 2, mode="L")
    palette = Image.fromarray(np.array([[0, 1, 2, 21], [21, 2, 1, 0]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0] * 256)  # every index drawn red: the indices are the labels
    palette.save(tmp_path / "masks" / "palette.png")
    deep = np.array([[0, 1, 2, 65535], [2, 2, 1, 0]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "masks" / "deep.png")
    args = {"root": str(tmp_path), "num_classes": 3}
    dataset = build("image_folder", {**args, "ignore_index": 65535})
    assert dataset[0][1].tolist() == [[0, 1, 2, IGNORE_INDEX], [2, 2, 1, 0]]
    with pytest.raises(DataError, match=r"palette\.png' holds class 21"):
        dataset[1]
    assert build("image_folder", {**args, "ignore_index": 21})[1][1][0].tolist() == [
        0,
        1,
        2,
        IGNORE_INDEX,
    ]
