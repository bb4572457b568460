"""Pascal VOC detection data: ``Annotations/*.xml`` and ``JPEGImages/`` under one root.

Which images: the ids of a split file, ``ImageSets/Main/<split>.txt`` (``train``, ``val``,
``trainval`` or any other name) or any text file under the root (``split_file``), one id per line
(VOC's per-class files, ``<class>_train.txt``, add a flag column, which is ignored); without
either, every XML file.

Which classes: ``classes`` lists the names, numbered ``1..K`` in that order; ``voc`` (the
default) is the 20 Pascal VOC names, and ``annotations`` reads the names from every XML file in
the annotation folder, sorted, so a train and a val split of one folder agree on them.
``class_map`` renames names as they are read, which merges several into one (``{Dead: Tree,
Alive: Tree}``), and maps a name to null to drop its objects.

VOC boxes are 1-based inclusive pixel indices; they become ``(xmin - 1, ymin - 1, xmax, ymax)``
so a box's width counts its pixels. Objects marked ``difficult`` are never training targets by
default (mmdetection does not train on them either) but ignore regions: the detectors' training
loss leaves the anchors on them out (``maskd_core.models.detection_ignore``), and evaluation
leaves them out as the VOC benchmark does. Every XML file is parsed when the dataset is built,
so a broken one fails the job before training, with the file and the object in the error.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from maskd_core.data import DATASETS, DEFAULT_PREFIX, scan
from maskd_core.data.detection_common import (
    DetectionDataset,
    DetectionSample,
    Objects,
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


CLASS_PRESETS: dict[str, tuple[str, ...]] = {"voc": VOC_CLASSES}
"""Class lists by name, for ``classes``."""

ClassName = Annotated[str, Field(min_length=1, max_length=256)]


class VocArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: LocalPath = Field(
        description="VOC year folder (e.g. /data/VOCdevkit/VOC2007) holding Annotations/ and "
        "JPEGImages/ (and ImageSets/Main/ when split is given)."
    )
    split: Annotated[str, SubPathOf("root", "ImageSets/Main/{}.txt")] | None = Field(
        default="trainval",
        description="Read image ids from ImageSets/Main/{split}.txt (train, val, trainval, "
        "test or any other name); none: every XML file.",
    )
    split_file: Annotated[str, SubPathOf("root")] | None = Field(
        default=None,
        description="Instead of split: a text file under root listing the image ids, one a "
        "line, e.g. ImageSets/Segmentation/val.txt.",
    )
    annotations_dir: Annotated[str, SubPathOf("root")] = Field(
        default="Annotations", description="Subfolder of root with one XML file per image."
    )
    images_dir: Annotated[str, SubPathOf("root")] = Field(
        default="JPEGImages", description="Subfolder of root with the images."
    )
    classes: list[ClassName] | Literal["voc", "annotations"] = Field(
        default="voc",
        description="Class names, numbered 1..K in order; 'voc': the 20 Pascal VOC classes; "
        "'annotations': every name in the annotation folder's XML files (after class_map), "
        "sorted.",
    )
    class_map: dict[str, ClassName | None] = Field(
        default_factory=dict,
        description="Renames <name>s as they are read, to merge classes ({Dead: Tree, Alive: "
        "Tree}) or, mapped to null, drop their objects.",
    )
    difficult: Literal["ignore", "skip", "keep"] = Field(
        default="ignore",
        description="Objects marked difficult: ignore: ignore regions, so the anchors on them "
        "are neither objects nor background in training, and evaluation leaves them out as "
        "the VOC benchmark does; skip: dropped (their anchors train as background); keep: "
        "targets like the others.",
    )

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: list[str] | str) -> list[str] | str:
        if isinstance(classes, list):
            if not classes:
                raise ValueError("list at least one class, or 'voc' or 'annotations'")
            if len(set(classes)) != len(classes):
                raise ValueError("class names must be unique")
        return classes

    @model_validator(mode="after")
    def _one_split(self) -> VocArgs:
        if self.split_file is not None and "split" in self.model_fields_set and self.split:
            raise ValueError(
                "give split (a name in ImageSets/Main) or split_file (a path under root), not both"
            )
        return self


class _Object(NamedTuple):
    position: int
    """Position among the file's <object>s, for messages."""
    name: str
    """The class name after ``class_map``."""
    difficult: bool
    box: tuple[float, float, float, float]
    """``xyxy``, 0-based, not yet clipped."""


class _Annotation(NamedTuple):
    """What one XML file says, before its names become class ids."""

    xml_name: str
    file_name: str
    width: float
    height: float
    objects: list[_Object]


class _Image(Objects):
    __slots__ = ("file_name",)

    def __init__(self, file_name: str) -> None:
        super().__init__()
        self.file_name = file_name


class VocDetection(DetectionDataset):
    """The images of one VOC split, in the order of the split file (or of the file names)."""

    def __init__(self, args: VocArgs, prefix: str = DEFAULT_PREFIX) -> None:
        root = resolve_path(args.root, f"{prefix}.root")
        annotation_dir = sub_path(args, "annotations_dir", prefix)
        self.image_dir = image_dir = sub_path(args, "images_dir", prefix)
        self.class_map = args.class_map
        for folder, given, what in (
            (annotation_dir, args.annotations_dir, "XML annotations"),
            (image_dir, args.images_dir, "images"),
        ):
            if not folder.is_dir():
                raise SpecError(
                    f"VOC folder {args.root}/{given} does not exist; root must hold Annotations/ "
                    f"(one XML per image), JPEGImages/ and optionally ImageSets/Main/<split>.txt, "
                    f"and this one should hold the {what}",
                    field=f"{prefix}.root",
                )
        deadline = ScanDeadline()
        parsed: dict[str, _Annotation] = {}
        if (args.split is None and args.split_file is None) or args.classes == "annotations":
            for path in list_files(
                annotation_dir,
                suffixes=frozenset({".xml"}),
                within=root,
                field=f"{prefix}.annotations_dir",
                deadline=deadline,
                recursive=False,
            ):
                deadline.check(f"{prefix}.root")
                parsed[path.stem] = self._parse(path)
        if args.split_file is not None:
            ids = _read_split(sub_path(args, "split_file", prefix), args.split_file, prefix)
            where = f"split_file {args.split_file!r}"
        elif args.split is not None:
            split_file = f"ImageSets/Main/{args.split}.txt"
            ids = _read_split(sub_path(args, "split", prefix), split_file, prefix)
            where = f"split {args.split!r}"
        else:
            ids = sorted(parsed)
            where = "the annotation folder"
        if args.classes == "annotations":
            names = sorted({obj.name for ann in parsed.values() for obj in ann.objects})
            if not names:
                raise SpecError(
                    f"no <object> in {args.root}/{args.annotations_dir} names a class (after "
                    "class_map); list the classes, or point annotations_dir at the XML files",
                    field=f"{prefix}.classes",
                )
        elif isinstance(args.classes, str):
            names = list(CLASS_PRESETS[args.classes])
        else:
            names = list(args.classes)
        self.class_ids = {name: index + 1 for index, name in enumerate(names)}
        self.class_names = {index: name for name, index in self.class_ids.items()}
        self.num_classes = len(names)
        self.difficult = args.difficult
        self.samples: list[_Image] = []
        for image_id in ids:
            deadline.check(f"{prefix}.root")
            annotation = parsed.get(image_id)
            if annotation is None:
                what = f"{where} (id {image_id!r})"
                annotation = self._parse(file_under(annotation_dir, f"{image_id}.xml", what))
            self.samples.append(self._image(annotation))

    def _parse(self, xml_file: Path) -> _Annotation:
        """The image file name (relative to the image folder), size and objects of one
        annotation file, with ``class_map`` applied and dropped objects left out."""
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
        objects: list[_Object] = []
        for index, obj in enumerate(annotation.iter("object")):
            given = (obj.findtext("name") or "").strip()
            class_name = self.class_map.get(given, given)
            if class_name is None:
                continue
            where = f"{name}: object {index} ({given or 'no name'})"
            try:
                xmin, ymin, xmax, ymax = (
                    float(obj.findtext(f"bndbox/{key}") or "")
                    for key in ("xmin", "ymin", "xmax", "ymax")
                )
            except ValueError:
                raise DataError(
                    f"{where} needs a <bndbox> with numeric xmin, ymin, xmax, ymax"
                ) from None
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            objects.append(_Object(index, class_name, difficult, (xmin - 1, ymin - 1, xmax, ymax)))
        return _Annotation(name, file_name, width, height, objects)

    def _image(self, annotation: _Annotation) -> _Image:
        """The objects of one annotation as class ids, boxes clipped to the image."""
        image = _Image(annotation.file_name)
        for obj in annotation.objects:
            where = f"{annotation.xml_name}: object {obj.position} ({obj.name or 'no name'})"
            if obj.name not in self.class_ids:
                raise DataError(
                    f"{where} has class {obj.name!r}, which is not one of the dataset's "
                    f"classes ({', '.join(self.class_ids)}); add it to classes, or rename or "
                    "drop it with class_map"
                )
            if obj.difficult and self.difficult == "skip":
                continue
            box = clean_box(obj.box, annotation.width, annotation.height, where)
            if box is not None:
                ignore = obj.difficult and self.difficult == "ignore"
                image.add(box, self.class_ids[obj.name], ignore=ignore)
        return image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> DetectionSample:
        entry = self.samples[index]
        # Resolved when read, so a link inside the image folder cannot lead out of it.
        what = f"the <filename> of sample {index}"
        return entry.sample(load_image(file_under(self.image_dir, entry.file_name, what)))


MAX_SPLIT_FILE_BYTES = 64 * 1024 * 1024
"""The largest split file read (the ids of ``scan.MAX_FOLDER_ENTRIES`` images take a few MiB)."""


def _read_split(split_file: Path, relative: str, prefix: str) -> list[str]:
    """The image ids a split file lists (the first word of each line), within the bounds every
    dataset listing has. ``relative`` is its path under the root, as messages show it."""
    field = f"{prefix}.split" if relative.startswith("ImageSets/Main/") else f"{prefix}.split_file"
    if not split_file.is_file():
        raise SpecError(
            f"VOC split file {relative!r} does not exist under root; name a split listed in "
            "ImageSets/Main (train, val, trainval, test, ...), give split_file, or set split "
            "to null to use every XML file",
            field=field,
        )
    if split_file.stat().st_size > MAX_SPLIT_FILE_BYTES:
        raise SpecError(
            f"VOC split file {relative!r} is larger than {MAX_SPLIT_FILE_BYTES} bytes, the most "
            "a split file may be",
            field=field,
        )
    try:
        lines = split_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else exc.reason
        raise DataError(f"VOC split file {relative!r} cannot be read as text ({reason})") from None
    if len(lines) > scan.MAX_FOLDER_ENTRIES:
        raise SpecError(
            f"VOC split file {relative!r} lists more than {scan.MAX_FOLDER_ENTRIES} images, "
            "the most a dataset may hold",
            field=field,
        )
    return [words[0] for words in (line.split() for line in lines) if words]


@DATASETS.register("voc", args=VocArgs)
def build(args: VocArgs, seed: int, *, prefix: str = DEFAULT_PREFIX) -> VocDetection:
    """Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/); classes 1..K by name."""
    del seed  # the files fix the samples
    return VocDetection(args, prefix)
