"""COCO-format detection data: an ``instances_*.json`` file and a folder of images.

Category ids become class ids one of two ways (``category_ids``). ``contiguous`` (the default)
numbers them ``1..K`` in ascending order of the ids in the file's ``categories`` list (COCO's 80
categories have ids 1..90 with gaps; they become 1..80), so the detectors have no unused
outputs. ``original`` keeps the file's ids as the class ids (``num_classes`` is the largest id,
the ids between unused), which is what a teacher trained with the ids as labels expects:
torchvision's own COCO detectors have 91 outputs for that reason. A validation file must list
the same categories, so both files number the classes alike.

Crowd annotations (``iscrowd: 1``, or ``ignore: 1`` as some COCO-style files mark them) are never
training targets: they mark regions of many objects, not one box to learn, and the paper's
mmdetection configs do not train on them either. With ``crowd: ignore`` (the default) they are
kept as ignore regions: the training loss leaves the anchors on a crowd out (neither object nor
background, unless matched to a real object), and evaluation treats them as COCO's own protocol
does (a detection on a crowd of its class is neither a hit nor a false positive). ``crowd: skip``
drops them, so the anchors on a crowd train as background. Images without annotations are kept
as negatives. The whole annotation file is checked when the dataset is built, so a broken entry
fails the job before training, with the file and the annotation id in the error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from maskd_core.data import DATASETS, DEFAULT_PREFIX
from maskd_core.data.detection_common import (
    DetectionDataset,
    DetectionSample,
    Objects,
    clean_box,
    load_image,
)
from maskd_core.errors import DataError, SpecError
from maskd_core.paths import LocalPath, check_relative, file_under, resolve_path

MAX_ANNOTATION_FILE_BYTES = 1024 * 2**20
"""The largest annotation file read: twice COCO's largest, so a stray multi-gigabyte file is
refused before validation (on the API, while the submitter waits) loads it into memory."""

MAX_ORIGINAL_CATEGORY_ID = 4096
"""The largest category id kept as a class id (``category_ids: original``): every id up to it
becomes a detector output, so an id in the millions would build a model no GPU holds."""


class CocoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    annotations: LocalPath = Field(
        description="COCO instances JSON, e.g. /data/coco/annotations/instances_train2017.json."
    )
    images: LocalPath = Field(description="Folder holding the files named by images[].file_name.")
    keep_empty_images: bool = Field(
        default=True, description="Keep images without (non-crowd) objects as negatives."
    )
    category_ids: Literal["contiguous", "original"] = Field(
        default="contiguous",
        description="contiguous: categories sorted by id become classes 1..K; original: the "
        "file's category ids are the class ids (num_classes = the largest id), as a teacher "
        "trained on the raw ids (torchvision's 91-class COCO models) expects.",
    )
    crowd: Literal["ignore", "skip"] = Field(
        default="ignore",
        description="Crowd annotations (iscrowd: 1 or ignore: 1) are never training targets; "
        "ignore: the training loss leaves the anchors on them out (neither object nor "
        "background) and evaluation the detections on them, as COCO's protocol does; skip: "
        "they are dropped, and the anchors on them train as background.",
    )


class _Image(Objects):
    """One image's file (as the annotation file names it, relative to the image folder) and
    its objects."""

    __slots__ = ("file_name",)

    def __init__(self, file_name: str) -> None:
        super().__init__()
        self.file_name = file_name


class CocoDetection(DetectionDataset):
    """Images of a COCO instances file, in the file's image order."""

    def __init__(self, args: CocoArgs, prefix: str = DEFAULT_PREFIX) -> None:
        annotations = resolve_path(args.annotations, f"{prefix}.annotations")
        image_dir = resolve_path(args.images, f"{prefix}.images")
        self.image_dir = image_dir
        if not annotations.is_file():
            raise SpecError(
                f"COCO annotation file {args.annotations!r} does not exist; give the path of an "
                "instances JSON such as annotations/instances_train2017.json",
                field=f"{prefix}.annotations",
            )
        if not image_dir.is_dir():
            raise SpecError(
                f"COCO image folder {args.images!r} does not exist; give the folder holding "
                "the files named by the annotation file's images[].file_name (e.g. train2017/)",
                field=f"{prefix}.images",
            )
        if annotations.stat().st_size > MAX_ANNOTATION_FILE_BYTES:
            raise SpecError(
                f"COCO annotation file {args.annotations!r} is larger than "
                f"{MAX_ANNOTATION_FILE_BYTES // 2**20} MiB, the most one may be (COCO's "
                "instances_train2017.json is 448 MiB); split it into smaller annotation files",
                field=f"{prefix}.annotations",
            )
        name = Path(args.annotations).name
        data = _read_json(annotations, name)
        names = {
            _field(entry, "id", name, "category"): str(entry.get("name", ""))
            for entry in _entries(data, "categories", name)
        }
        if not names:
            raise DataError(f"{name}: the categories list is empty")
        categories = sorted(names)
        if args.category_ids == "original":
            if categories[0] < 1 or categories[-1] > MAX_ORIGINAL_CATEGORY_ID:
                raise SpecError(
                    f"{name}: category ids run from {categories[0]} to {categories[-1]}; kept as "
                    f"class ids (category_ids: original) they must lie in 1..."
                    f"{MAX_ORIGINAL_CATEGORY_ID} (0 is the background); use category_ids: "
                    "contiguous",
                    field=f"{prefix}.category_ids",
                )
            self.class_ids = {category: category for category in categories}
        else:
            self.class_ids = {category: index + 1 for index, category in enumerate(categories)}
        self.num_classes = max(self.class_ids.values())
        self.class_names = {
            self.class_ids[category]: names[category] or str(category) for category in categories
        }
        keep_crowds = args.crowd == "ignore"
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
            crowd = bool(entry.get("iscrowd", 0) or entry.get("ignore", 0))
            if crowd and not keep_crowds:
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
                images[owner].add(box, self.class_ids[category], ignore=crowd)
        self.images = [image for image in images.values() if args.keep_empty_images or image.boxes]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> DetectionSample:
        entry = self.images[index]
        # Resolved when read, so a link inside the image folder cannot lead out of it.
        where = f"the COCO file_name of sample {index}"
        return entry.sample(load_image(file_under(self.image_dir, entry.file_name, where)))


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
def build(args: CocoArgs, seed: int, *, prefix: str = DEFAULT_PREFIX) -> CocoDetection:
    """COCO instances JSON + image folder; categories become classes 1..K (or keep their ids)."""
    del seed  # the file fixes the samples
    return CocoDetection(args, prefix)
