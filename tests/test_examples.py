"""Every shipped example spec passes the validation a submission gets (a dry run).

The examples name files this machine does not have: COCO under ``/data/coco``, weights written
by ``maskd train-teacher`` or downloaded from torchvision. Each test writes tiny stand-ins for the
data files in the format the spec names (a COCO instances file per ``annotations``, with its
images) under ``tmp_path``, and leaves the weight files out: what is checked is everything else,
from the dataset and validation dataset to the models, their layers and channels. The paper's
COCO specs must score on val2017, not on a random part of train2017.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from maskd_core.spec import JobSpec
from maskd_core.validate import input_paths, validate_job

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPECS = sorted(EXAMPLES.glob("*.yaml"))
DATA_ROOT = "/data/"
"""Where the examples expect data on a GPU host; rewritten under ``tmp_path`` here."""


def test_the_examples_are_found() -> None:
    assert {path.name for path in SPECS} >= {
        "quickstart-segmentation.yaml",
        "fcos-r101-r50-coco.yaml",
        "retinanet-r101-r50-coco.yaml",
    }


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
        spec[role].pop("weights", None)
        spec[role].get("args", {}).pop("backbone_weights", None)
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


def stand_in(path: Path, tmp_path: Path) -> JobSpec:
    spec = without_weights(moved(yaml.safe_load(path.read_text()), tmp_path))
    for key in ("dataset", "val_dataset"):
        source = spec.get(key)
        if source is not None and spec["dataset"].get("name") == "coco":
            write_coco(source["args"])
    return JobSpec.model_validate(spec)


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=lambda path: path.stem)
def test_every_example_validates(path: Path, tmp_path: Path) -> None:
    plan = validate_job(stand_in(path, tmp_path))
    assert plan.levels


@pytest.mark.parametrize("path", SPECS, ids=lambda path: path.stem)
def test_examples_on_data_with_a_validation_split_use_it(path: Path) -> None:
    spec = JobSpec.model_validate(yaml.safe_load(path.read_text()))
    if spec.dataset.name != "coco":
        return  # generated data, split at random by val_fraction
    assert spec.val_dataset is not None, f"{path.name} must score on the dataset's val split"
    assert spec.val_dataset.args["annotations"] == "/data/coco/annotations/instances_val2017.json"
    fields = {item.field for item in input_paths(spec)}
    assert {"val_dataset.args.annotations", "val_dataset.args.images"} <= fields
