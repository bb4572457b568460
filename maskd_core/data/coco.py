"""COCO-format detection data: an ``instances_*.json`` file and a folder of images.

Category ids are mapped to contiguous class ids ``1..K`` in ascending order of the ids in the
file's ``categories`` list (COCO's 80 categories have ids 1..90 with gaps; they become 1..80),
because the detectors have one output per class id. Crowd annotations (``iscrowd: 1``) are
skipped: they mark regions of many objects, not one box to learn. Images without annotations
are kept as negatives. The whole annotation file is checked when the dataset is built, so a
broken entry fails the job before training, with the file and the annotation id in the error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from maskd_core.data import DATASETS
from maskd_core.data.detection_common import (
    DetectionDataset,
    DetectionSample,
    as_targets,
    clean_box,
    load_image,
)
from maskd_core.errors import DataError, SpecError
from maskd_core.paths import LocalPath, check_relative, file_under, resolve_path

MAX_ANNOTATION_FILE_BYTES = 1024 * 2**20
"""The largest annotation file read: twice COCO's largest, so a stray multi-gigabyte file is
refused before validation (on the API, while the submitter waits) loads it into memory."""


class CocoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    annotations: LocalPath = Field(
        description="COCO instances JSON, e.g. /data/coco/annotations/instances_train2017.json."
    )
    images: LocalPath = Field(description="Folder holding the files named by images[].file_name.")
    keep_empty_images: bool = Field(
        default=True, description="Keep images without (non-crowd) objects as negatives."
    )


class _Image:
    """One image's file (as the annotation file names it, relative to the image folder) and
    targets, as plain lists until a sample is asked for."""

    __slots__ = ("boxes", "file_name", "labels")

    def __init__(self, file_name: str) -> None:
        self.file_name = file_name
        self.boxes: list[tuple[float, float, float, float]] = []
        self.labels: list[int] = []


class CocoDetection(DetectionDataset):
    """Images of a COCO instances file, in the file's image order."""

    def __init__(self, args: CocoArgs) -> None:
        annotations = resolve_path(args.annotations, "dataset.args.annotations")
        image_dir = resolve_path(args.images, "dataset.args.images")
        self.image_dir = image_dir
        if not annotations.is_file():
            raise SpecError(
                f"COCO annotation file {args.annotations!r} does not exist; give the path of an "
                "instances JSON such as annotations/instances_train2017.json",
                field="dataset.args.annotations",
            )
        if not image_dir.is_dir():
            raise SpecError(
                f"COCO image folder {args.images!r} does not exist; give the folder holding "
                "the files named by the annotation file's images[].file_name (e.g. train2017/)",
                field="dataset.args.images",
            )
        if annotations.stat().st_size > MAX_ANNOTATION_FILE_BYTES:
            raise SpecError(
                f"COCO annotation file {args.annotations!r} is larger than "
                f"{MAX_ANNOTATION_FILE_BYTES // 2**20} MiB, the most one may be (COCO's "
                "instances_train2017.json is 448 MiB); split it into smaller annotation files",
                field="dataset.args.annotations",
            )
        name = Path(args.annotations).name
        data = _read_json(annotations, name)
        categories = sorted(
            {_field(entry, "id", name, "category") for entry in _entries(data, "categories", name)}
        )
        if not categories:
            raise DataError(f"{name}: the categories list is empty")
        self.class_ids = {category: index + 1 for index, category in enumerate(categories)}
        self.num_classes = len(categories)
        images: dict[int, _Image] = {}
        sizes: dict[int, tuple[float, float]] = {}
        for entry in _entries(data, "images", name):
            image_id = _field(entry, "id", name, "image")
            try:
                sizes[image_id] = (float(entry["width"]), float(entry["height"]))
                file_name = str(entry["file_name"])
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    f"{name}: image id {image_id} needs file_name, width and height"
                ) from None
            check_relative(file_name, f"{name}: image id {image_id}")
            images[image_id] = _Image(file_name)
        for entry in _entries(data, "annotations", name):
            ann_id = _field(entry, "id", name, "annotation")
            if entry.get("iscrowd", 0):
                continue
            where = f"{name}: annotation id {ann_id}"
            owner = entry.get("image_id")
            if owner not in images:
                raise DataError(f"{where} refers to image id {owner!r}, which is not listed")
            category = entry.get("category_id")
            if category not in self.class_ids:
                raise DataError(f"{where} has category_id {category!r}, which is not in categories")
            bbox = entry.get("bbox")
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(isinstance(v, int | float) for v in bbox)
            ):
                raise DataError(f"{where} has bbox {bbox!r}; expected [x, y, width, height]")
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                side = "width" if w < 0 else "height"
                raise DataError(f"{where} has bbox {bbox} with negative {side}")
            box = clean_box((x, y, x + w, y + h), *sizes[owner], where)
            if box is not None:
                images[owner].boxes.append(box)
                images[owner].labels.append(self.class_ids[category])
        self.images = [image for image in images.values() if args.keep_empty_images or image.boxes]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> DetectionSample:
        entry = self.images[index]
        boxes, labels = as_targets(entry.boxes, entry.labels)
        # Resolved when read, so a link inside the image folder cannot lead out of it.
        where = f"the COCO file_name of sample {index}"
        return DetectionSample(
            load_image(file_under(self.image_dir, entry.file_name, where)), boxes, labels
        )


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise DataError(f"{name}: not a readable JSON file ({reason})") from None
    if not isinstance(data, dict):
        raise DataError(f"{name}: expected a JSON object with images, annotations, categories")
    return data


def _entries(data: dict[str, Any], key: str, name: str) -> list[dict[str, Any]]:
    entries = data.get(key)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{name}: {key!r} must be a list of objects (a COCO instances file)")
    return entries


def _field(entry: dict[str, Any], key: str, name: str, kind: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int):
        raise DataError(f"{name}: {kind} entry {entry!r:.200} has no integer {key!r}")
    return value


@DATASETS.register("coco", args=CocoArgs)
def build(args: CocoArgs, seed: int) -> CocoDetection:
    """COCO instances JSON + image folder; categories become classes 1..K."""
    del seed  # the file fixes the samples
    return CocoDetection(args)
