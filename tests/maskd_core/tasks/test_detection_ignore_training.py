"""COCO crowds reach the detection task's training loss: from the annotation file through the
training loader's batches (flipped with their image) to the detector, which leaves them out."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision.models.detection import FCOS

from maskd_core.data import DATASETS
from maskd_core.data.coco import CocoDetection
from maskd_core.loader import train_batches
from maskd_core.models import MODELS
from maskd_core.models.detection_ignore import with_ignore_regions
from maskd_core.tasks.detection import DetectionBatch, DetectionTask

SIZE = 48
REAL_XYWH = [2, 2, 18, 18]
CROWD_XYWH = [29, 25, 17, 21]
CROWD_XYXY = [29.0, 25.0, 46.0, 46.0]


def coco_dataset(tmp_path: Path) -> CocoDetection:
    """One 48x48 image with one object and one crowd of the same category."""
    images = tmp_path / "images"
    images.mkdir()
    pixels = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(images / "a.png")
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": REAL_XYWH, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": CROWD_XYWH, "iscrowd": 1},
    ]
    path = tmp_path / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": SIZE, "height": SIZE}],
                "categories": [{"id": 5, "name": "person"}],
                "annotations": annotations,
            }
        )
    )
    args = {"annotations": str(path), "images": str(images)}
    dataset: CocoDetection = DATASETS.get("coco")(DATASETS.parse_args("coco", args), 0)
    return dataset


def tiny_detector(family: str) -> Any:
    torch.manual_seed(0)
    args = {"backbone": "tiny", "min_size": 64, "max_size": 64, "fpn_channels": 64}
    return MODELS.get(family)(MODELS.parse_args(family, args), 1).train()


def test_training_batches_carry_the_crowds_flipped_with_their_image(tmp_path: Path) -> None:
    batches = train_batches(coco_dataset(tmp_path), DetectionTask(), batch_size=1, seed=0)
    seen = set()
    for batch in itertools.islice(batches, 8):
        assert batch.ignore is not None
        crowd = batch.ignore[0]["boxes"].tolist()
        mirrored = [SIZE - CROWD_XYXY[2], CROWD_XYXY[1], SIZE - CROWD_XYXY[0], CROWD_XYXY[3]]
        flipped = batch.targets[0]["boxes"][0, 0] > SIZE / 2
        assert crowd == [mirrored if flipped else CROWD_XYXY]
        seen.add(bool(flipped))
    assert seen == {True, False}, "eight steps draw both the flip and its absence"


@pytest.mark.parametrize("family", ["retinanet", "fcos", "fasterrcnn"])
def test_the_training_loss_leaves_the_crowd_out(tmp_path: Path, family: str) -> None:
    task = DetectionTask()
    batch = task.to_device(task.collate([coco_dataset(tmp_path)[0]]), torch.device("cpu"))
    assert batch.ignore is not None and batch.ignore[0]["boxes"].tolist() == [CROWD_XYXY]
    model = tiny_detector(family)

    torch.manual_seed(1)
    total, parts = task.training_loss(model, batch)
    torch.manual_seed(1)
    direct = model(batch.images, with_ignore_regions(batch.targets, [batch.ignore[0]["boxes"]]))
    torch.manual_seed(1)
    _, as_background = task.training_loss(model, batch._replace(ignore=None))

    assert parts == {name: float(value.detach()) for name, value in direct.items()}
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-5)
    classification = "loss_classifier" if family == "fasterrcnn" else "classification"
    assert parts[classification] != pytest.approx(as_background[classification], rel=1e-9)


def test_a_detector_that_would_train_crowds_as_background_is_refused(tmp_path: Path) -> None:
    task = DetectionTask()
    batch: DetectionBatch = task.collate([coco_dataset(tmp_path)[0]])
    built = tiny_detector("fcos")
    plain = FCOS(built.backbone, 2, min_size=64, max_size=64).train()
    with pytest.raises(TypeError, match=r"ignore regions.*detection registry"):
        task.training_loss(plain, batch)
    task.training_loss(plain, batch._replace(ignore=None))
