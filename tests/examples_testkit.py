"""The shipped example specs as this machine can run them: stand-ins for their data.

The examples name files this machine does not have: COCO under ``/data/coco``, weights written
by ``maskd train-teacher`` or downloaded from torchvision. ``stand_in_document`` moves every
``/data/...`` path under a test's folder, writes tiny stand-ins there for the data files in the
format the spec names (a COCO instances file per ``annotations``, with its images; an image and
its mask in an ``image_folder``'s Cityscapes-style layout), and leaves
the weight files out; everything else (the dataset and validation dataset, the models, their
layers and channels, the sections the example omits) is the example's own. Shared by the tests
that validate the examples in the core and those that submit them to the API.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

DATA_ROOT = "/data/"
"""Where the examples expect data on a GPU host; rewritten under the test's folder."""


def example_names() -> list[str]:
    """The example specs the ``maskd_examples`` package ships, as installed."""
    return sorted(
        entry.name for entry in files("maskd_examples").iterdir() if entry.name.endswith(".yaml")
    )


def example_document(name: str) -> dict[str, Any]:
    """The shipped example ``name`` as its YAML reads, nothing filled in."""
    document: dict[str, Any] = yaml.safe_load((files("maskd_examples") / name).read_text())
    return document


def moved(value: Any, tmp_path: Path) -> Any:
    """``value`` with every ``/data/...`` path moved under ``tmp_path``."""
    if isinstance(value, dict):
        return {key: moved(item, tmp_path) for key, item in value.items()}
    if isinstance(value, list):
        return [moved(item, tmp_path) for item in value]
    if isinstance(value, str) and value.startswith(DATA_ROOT):
        return str(tmp_path / value.removeprefix("/"))
    return value


def without_weights(spec: dict[str, Any]) -> dict[str, Any]:
    for role in ("teacher", "student"):
        model = spec.get(role, {})  # a teacher job has no student
        model.pop("weights", None)
        model.get("args", {}).pop("backbone_weights", None)
    return spec


def write_coco(args: dict[str, Any]) -> None:
    """A two-image COCO instances file with one crowd region, and its images."""
    images = Path(args["images"])
    images.mkdir(parents=True, exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (120, 60, 30)).save(images / name)
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 90, "bbox": [10, 5, 30, 20], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 64, 20], "iscrowd": 1},
        ],
    }
    annotations = Path(args["annotations"])
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(data))


def write_image_folder(args: dict[str, Any]) -> None:
    """One image and its class-index mask where ``args`` (an ``image_folder``'s) look for them,
    in a city sub-folder and with the name suffixes as Cityscapes has them; the mask holds every
    class and the ignore value."""
    root = Path(args["root"])
    city = "aachen"
    stem = f"{city}_000000_000019"
    images = root / args.get("images_dir", "images") / city
    masks = root / args.get("masks_dir", "masks") / city
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (128, 64), (70, 130, 180)).save(
        images / f"{stem}{args.get('image_suffix', '')}.png"
    )
    classes = [*range(args["num_classes"]), args.get("ignore_index", 255)]
    mask = Image.new("L", (128, 64))
    mask.putdata([classes[(x // 4) % len(classes)] for _ in range(64) for x in range(128)])
    mask.save(masks / f"{stem}{args.get('mask_suffix', '')}.png")


STAND_INS = {"coco": write_coco, "image_folder": write_image_folder}
"""The dataset formats whose files the examples name, and what writes a stand-in of each."""


def _reads_moved_data(source: dict[str, Any], tmp_path: Path) -> bool:
    return any(
        isinstance(value, str) and value.startswith(str(tmp_path))
        for value in source.get("args", {}).values()
    )


def stand_in_document(document: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """``document`` (an example's YAML) on stand-in data under ``tmp_path``, without weights."""
    spec = without_weights(moved(document, tmp_path))
    write = STAND_INS.get(spec["dataset"].get("name"))
    for key in ("dataset", "val_dataset"):
        source = spec.get(key)
        # Only data the example expects under /data: other paths are the user's own to make.
        if source is not None and write is not None and _reads_moved_data(source, tmp_path):
            write(source["args"])
    return spec
