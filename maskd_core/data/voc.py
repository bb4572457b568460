"""Pascal VOC detection data: ``Annotations/*.xml`` and ``JPEGImages/`` under one root.

Classes are the names in ``classes`` (default: the 20 VOC classes), numbered ``1..K`` in that
order. VOC boxes are 1-based inclusive pixel indices; they become ``(xmin - 1, ymin - 1, xmax,
ymax)`` so a box's width counts its pixels. Objects marked ``difficult`` are skipped by default:
the VOC benchmark ignores them when scoring, and mmdetection does not train on them either.
Every XML file is parsed when the dataset is built, so a broken one fails the job before
training, with the file and the object in the error.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from maskd_core.data import DATASETS, scan
from maskd_core.data.detection_common import (
    DetectionDataset,
    DetectionSample,
    as_targets,
    clean_box,
    load_image,
)
from maskd_core.data.scan import ScanDeadline, list_files
from maskd_core.errors import DataError, SpecError
from maskd_core.paths import (
    LocalPath,
    SubPathOf,
    check_relative,
    file_under,
    resolve_path,
    sub_path,
)

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class VocArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: LocalPath = Field(
        description="VOC year folder (e.g. /data/VOCdevkit/VOC2007) holding Annotations/ and "
        "JPEGImages/ (and ImageSets/Main/ when split is given)."
    )
    split: Annotated[str, SubPathOf("root", "ImageSets/Main/{}.txt")] | None = Field(
        default="trainval",
        description="Read image ids from ImageSets/Main/{split}.txt; none: every XML file.",
    )
    annotations_dir: Annotated[str, SubPathOf("root")] = Field(
        default="Annotations", description="Subfolder of root with one XML file per image."
    )
    images_dir: Annotated[str, SubPathOf("root")] = Field(
        default="JPEGImages", description="Subfolder of root with the images."
    )
    classes: list[str] = Field(
        default_factory=lambda: list(VOC_CLASSES), min_length=1, description="Class names, 1..K."
    )
    difficult: Literal["skip", "keep"] = Field(
        default="skip", description="Whether objects marked difficult become targets."
    )

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) != len(classes):
            raise ValueError("class names must be unique")
        return classes


class VocDetection(DetectionDataset):
    """The images of one VOC split, in the order of the split file (or of the file names)."""

    def __init__(self, args: VocArgs) -> None:
        root = resolve_path(args.root, "dataset.args.root")
        annotation_dir = sub_path(args, "annotations_dir")
        self.image_dir = image_dir = sub_path(args, "images_dir")
        for folder, given, what in (
            (annotation_dir, args.annotations_dir, "XML annotations"),
            (image_dir, args.images_dir, "images"),
        ):
            if not folder.is_dir():
                raise SpecError(
                    f"VOC folder {args.root}/{given} does not exist; root must hold Annotations/ "
                    f"(one XML per image), JPEGImages/ and optionally ImageSets/Main/<split>.txt, "
                    f"and this one should hold the {what}",
                    field="dataset.args.root",
                )
        deadline = ScanDeadline()
        if args.split is None:
            listed = list_files(
                annotation_dir,
                suffixes=frozenset({".xml"}),
                within=root,
                field="dataset.args.annotations_dir",
                deadline=deadline,
                recursive=False,
            )
            ids = sorted(path.stem for path in listed)
            where = "the annotation folder"
        else:
            ids = _read_split(sub_path(args, "split"), args)
            where = f"split {args.split!r}"
        self.class_ids = {name: index + 1 for index, name in enumerate(args.classes)}
        self.num_classes = len(args.classes)
        self.keep_difficult = args.difficult == "keep"
        self.samples = []
        for image_id in ids:
            deadline.check("dataset.args.root")
            xml_file = file_under(annotation_dir, f"{image_id}.xml", f"{where} (id {image_id!r})")
            self.samples.append(self._parse(xml_file))

    def _parse(
        self, xml_file: Path
    ) -> tuple[str, list[tuple[float, float, float, float]], list[int]]:
        """The image file name (relative to the image folder), boxes and labels of one
        annotation file."""
        name = xml_file.name
        try:
            tree = ET.parse(xml_file)
        except FileNotFoundError:
            raise DataError(f"VOC annotation {str(xml_file)!r} does not exist") from None
        except ET.ParseError as exc:
            raise DataError(f"{name}: not well-formed XML ({exc})") from None
        annotation = tree.getroot()
        file_name = annotation.findtext("filename") or f"{xml_file.stem}.jpg"
        check_relative(file_name, f"{name}: <filename>")
        try:
            width = float(annotation.findtext("size/width") or "inf")
            height = float(annotation.findtext("size/height") or "inf")
        except ValueError:
            raise DataError(f"{name}: <size> must hold numeric width and height") from None
        boxes: list[tuple[float, float, float, float]] = []
        labels: list[int] = []
        for index, obj in enumerate(annotation.iter("object")):
            class_name = (obj.findtext("name") or "").strip()
            where = f"{name}: object {index} ({class_name or 'no name'})"
            if class_name not in self.class_ids:
                raise DataError(
                    f"{where} has class {class_name!r}, which is not one of the dataset's "
                    f"classes ({', '.join(self.class_ids)}); add it to classes"
                )
            if (obj.findtext("difficult") or "0").strip() == "1" and not self.keep_difficult:
                continue
            try:
                xmin, ymin, xmax, ymax = (
                    float(obj.findtext(f"bndbox/{key}") or "")
                    for key in ("xmin", "ymin", "xmax", "ymax")
                )
            except ValueError:
                raise DataError(
                    f"{where} needs a <bndbox> with numeric xmin, ymin, xmax, ymax"
                ) from None
            box = clean_box((xmin - 1, ymin - 1, xmax, ymax), width, height, where)
            if box is not None:
                boxes.append(box)
                labels.append(self.class_ids[class_name])
        return file_name, boxes, labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> DetectionSample:
        file_name, box_list, label_list = self.samples[index]
        boxes, labels = as_targets(box_list, label_list)
        # Resolved when read, so a link inside the image folder cannot lead out of it.
        image_file = file_under(self.image_dir, file_name, f"the <filename> of sample {index}")
        return DetectionSample(load_image(image_file), boxes, labels)


MAX_SPLIT_FILE_BYTES = 64 * 1024 * 1024
"""The largest split file read (the ids of ``scan.MAX_FOLDER_ENTRIES`` images take a few MiB)."""


def _read_split(split_file: Path, args: VocArgs) -> list[str]:
    """The image ids a split file lists, within the bounds every dataset listing has."""
    given = f"{args.root}/ImageSets/Main/{args.split}.txt"
    if not split_file.is_file():
        raise SpecError(
            f"VOC split file {given!r} does not exist; name a split listed in "
            "ImageSets/Main (train, val, trainval, test) or set split to null to use "
            "every XML file",
            field="dataset.args.split",
        )
    if split_file.stat().st_size > MAX_SPLIT_FILE_BYTES:
        raise SpecError(
            f"VOC split file {given!r} is larger than {MAX_SPLIT_FILE_BYTES} bytes, the most a "
            "split file may be",
            field="dataset.args.split",
        )
    try:
        ids = split_file.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc.reason
        raise DataError(f"VOC split file {given!r} cannot be read as text ({reason})") from None
    if len(ids) > scan.MAX_FOLDER_ENTRIES:
        raise SpecError(
            f"VOC split file {given!r} lists more than {scan.MAX_FOLDER_ENTRIES} images, the "
            "most a dataset may hold",
            field="dataset.args.split",
        )
    return ids


@DATASETS.register("voc", args=VocArgs)
def build(args: VocArgs, seed: int) -> VocDetection:
    """Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/); classes 1..K by name."""
    del seed  # the files fix the samples
    return VocDetection(args)
