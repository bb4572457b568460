"""``image_folder``: images with PNG class-index masks, the Pascal VOC / Cityscapes layout.

::

    root/
      images/<dir>/<stem><image_suffix>.jpg   (any of .jpg .jpeg .png .bmp .tif .tiff .webp)
      masks/<dir>/<stem><mask_suffix>.png     (same sub-folders and stem; a class per pixel)

Sub-folders nest to any depth (Cityscapes' ``leftImg8bit/train/<city>/``). A mask is a palette
PNG (its pixel values are the class indices, whatever the palette's colours), an 8-bit
greyscale PNG or a 16-bit one; ``ignore_index`` marks unlabelled pixels. Images may mix RGB,
greyscale (8 or 16 bit) and palette files: every one is read as RGB. A dataset's own
train/val split is two sub-folders: ``images_dir: images/train`` for ``dataset`` and
``images_dir: images/val`` for ``val_dataset`` (or two roots).

The layout is checked when the dataset is built, which is what job validation does, so a wrong
path is a 422 before anything is queued. Pixel contents are only seen when a sample is read
during training; problems found then are ``DataError``s naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from maskd_core.data import DATASETS, DEFAULT_PREFIX
from maskd_core.data.base import DenseDataset
from maskd_core.data.scan import ScanDeadline, list_files
from maskd_core.data.transforms import (
    IGNORE_INDEX,
    ScaleRange,
    SegmentationSample,
    normalize,
    random_scale_crop_flip,
    resize_sample,
)
from maskd_core.errors import DataError, SpecError
from maskd_core.paths import LocalPath, SubPathOf, file_under, resolve_path, sub_path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_MODES = frozenset({"P", "L", "1", "I", "I;16", "I;16B", "I;16L"})
"""Pillow modes holding one value per pixel: palette, 8-bit, 1-bit, 32-bit and 16-bit."""
SIXTEEN_BIT_IMAGE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})
"""Greyscale image modes wider than 8 bits, which Pillow's RGB conversion would clip."""
NAME_SUFFIX = Field(max_length=128, pattern=r"^[^/\\\x00]*$")
"""A file-name suffix: part of one name, so never a path separator."""


class ImageFolderArgs(BaseModel):
    """Arguments of ``image_folder``."""

    model_config = ConfigDict(extra="forbid")

    root: LocalPath = Field(description="Folder holding the images and masks subfolders.")
    num_classes: int = Field(
        ge=2, le=255, description="Classes including background; mask values 0..num_classes-1."
    )
    images_dir: Annotated[str, SubPathOf("root")] = Field(
        default="images", description="Subfolder of root with the images (relative, inside root)."
    )
    masks_dir: Annotated[str, SubPathOf("root")] = Field(
        default="masks", description="Subfolder of root with the masks (relative, inside root)."
    )
    ignore_index: int = Field(
        default=IGNORE_INDEX,
        ge=0,
        le=65535,
        description="Mask value meaning 'no label' (excluded from loss and metrics); up to "
        "65535 for 16-bit masks.",
    )
    image_suffix: Annotated[str, NAME_SUFFIX] = Field(
        default="",
        description="End of every image's stem that its mask's name does not share, e.g. "
        "'_leftImg8bit' for Cityscapes.",
    )
    mask_suffix: Annotated[str, NAME_SUFFIX] = Field(
        default="",
        description="End of every mask's stem after the image's shared stem, e.g. "
        "'_gtFine_labelTrainIds' for Cityscapes.",
    )
    class_names: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        description="Names of the classes 0..num_classes-1 (optional); a val_dataset must "
        "give the same.",
    )
    image_size: int | tuple[int, int] | None = Field(
        default=None,
        description="Resize every sample to this (an int for a square, or [height, width]); "
        "needed when the images differ in size, since a batch needs one size.",
    )
    scale_range: ScaleRange = Field(
        default=(0.5, 2.0), description="Random rescale factors of the training augmentation."
    )
    hflip: bool = Field(default=True, description="Random horizontal flips when augmenting.")
    crop_size: tuple[PositiveInt, PositiveInt] | None = Field(
        default=None,
        description="[height, width] of the random crop every augmented (training) sample is "
        "cut to after the random rescale, padded with ignore where smaller (Cityscapes: "
        "[512, 1024]); validation samples stay whole. none: the sample's own size.",
    )

    @model_validator(mode="after")
    def _ignore_is_not_a_class(self) -> ImageFolderArgs:
        if self.ignore_index < self.num_classes:
            raise ValueError(
                f"ignore_index {self.ignore_index} is one of the {self.num_classes} classes; "
                "use a value >= num_classes (255 is the usual one)"
            )
        return self

    @model_validator(mode="after")
    def _one_name_per_class(self) -> ImageFolderArgs:
        names = self.class_names
        if names is not None and len(names) != self.num_classes:
            raise ValueError(
                f"class_names lists {len(names)} names but num_classes is {self.num_classes}; "
                "name every class, background (0) included"
            )
        if names is not None and len(set(names)) != len(names):
            raise ValueError("class_names must be unique")
        return self

    @property
    def size(self) -> tuple[int, int] | None:
        """``image_size`` as ``(height, width)``."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        return self.image_size


def _expected_layout(args: ImageFolderArgs) -> str:
    return (
        f"expected {args.root}/{args.images_dir}/<name>{args.image_suffix}.jpg|.png|... and "
        f"{args.root}/{args.masks_dir}/<name>{args.mask_suffix}.png (same sub-folders and "
        "<name>)"
    )


def _mask_name(image: Path, args: ImageFolderArgs) -> str | None:
    """The mask file name of ``image``, or None when its stem lacks ``image_suffix``."""
    stem = image.stem
    if args.image_suffix:
        if not stem.endswith(args.image_suffix):
            return None
        stem = stem[: -len(args.image_suffix)]
    return f"{stem}{args.mask_suffix}.png"


def _find_pairs(args: ImageFolderArgs, prefix: str) -> tuple[Path, list[tuple[Path, Path]]]:
    """The resolved root and the (image, mask) pairs under it.

    Both subfolders are listed within bounds (``maskd_core.data.scan``), each resolved under
    the root, so neither a sub-path nor a link inside them leads out of it. Errors repeat the
    paths the spec gave, never where links lead, and name fields under ``prefix``.
    """
    root_field = f"{prefix}.root"
    root = resolve_path(args.root, root_field)
    if not root.is_dir():
        raise SpecError(
            f"dataset folder {args.root!r} does not exist or is not a folder; "
            + _expected_layout(args),
            field=root_field,
        )
    images_root = sub_path(args, "images_dir", prefix)
    masks_root = sub_path(args, "masks_dir", prefix)
    deadline = ScanDeadline()
    listed: list[Path] = []
    if images_root.is_dir():
        listed = list_files(
            images_root,
            suffixes=IMAGE_EXTENSIONS,
            within=root,
            field=f"{prefix}.images_dir",
            deadline=deadline,
        )
    images = [(image, name) for image in listed if (name := _mask_name(image, args)) is not None]
    if not images:
        suffix = f" whose name ends in {args.image_suffix!r}" if args.image_suffix else ""
        raise SpecError(
            f"no images{suffix} found under {args.root}/{args.images_dir}; "
            + _expected_layout(args),
            field=root_field,
        )
    masks: set[Path] = set()
    if masks_root.is_dir():
        masks = {
            mask.relative_to(masks_root)
            for mask in list_files(
                masks_root,
                suffixes=frozenset({".png"}),
                within=root,
                field=f"{prefix}.masks_dir",
                deadline=deadline,
            )
        }
    pairs = [
        (image, masks_root / image.relative_to(images_root).parent / name) for image, name in images
    ]
    missing = [mask for _, mask in pairs if mask.relative_to(masks_root) not in masks]
    if missing:
        listing = ", ".join(
            repr(f"{args.masks_dir}/{mask.relative_to(masks_root)}") for mask in missing[:3]
        )
        raise SpecError(
            f"{len(missing)} of {len(pairs)} images have no mask (e.g. {listing}); "
            + _expected_layout(args),
            field=root_field,
        )
    return root, pairs


def _inside(root: Path, path: Path) -> Path:
    return file_under(root, str(path.relative_to(root)), "image_folder")


def _read_image(path: Path) -> torch.Tensor:
    """``float32 [3, H, W]`` in [0, 1] from any image mode: colour, palette and greyscale
    (8-bit, or 16-bit scaled by 65535 rather than clipped at 255 as Pillow's RGB conversion
    would) all become RGB, so a folder may mix them."""
    try:
        with Image.open(path) as image:
            if image.mode in SIXTEEN_BIT_IMAGE_MODES:
                grey = np.asarray(image).astype(np.float32) / 65535.0
                pixels = np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
            else:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _read_mask(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as mask:
            if mask.mode not in MASK_MODES:
                raise DataError(
                    f"mask {str(path)!r} has mode {mask.mode}; masks hold one class index per "
                    "pixel (a palette, or an 8- or 16-bit greyscale PNG), not colours"
                )
            values = np.asarray(mask).astype(np.int64)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read mask {str(path)!r}: {exc}") from None
    return torch.from_numpy(values)


class ImageFolder(DenseDataset):
    """Image/mask pairs read from disk on demand; see the module docstring."""

    task = "segmentation"

    def __init__(self, args: ImageFolderArgs, prefix: str = DEFAULT_PREFIX) -> None:
        self.args = args
        self.num_classes = args.num_classes
        if args.class_names is not None:
            self.class_names = dict(enumerate(args.class_names))
        self.root, self.pairs = _find_pairs(args, prefix)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> SegmentationSample:
        image_path, mask_path = self.pairs[index]
        # Checked again when read: a link swapped in after the listing still cannot lead out.
        image = _read_image(_inside(self.root, image_path))
        mask = _read_mask(_inside(self.root, mask_path))
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise DataError(
                f"mask {str(mask_path)!r} is {mask.shape[1]}×{mask.shape[0]} but its image "
                f"{str(image_path)!r} is {image.shape[2]}×{image.shape[1]}; a mask must match "
                "its image pixel for pixel"
            )
        ignored = mask == self.args.ignore_index
        out_of_range = mask[~ignored & ((mask < 0) | (mask >= self.num_classes))]
        if out_of_range.numel():
            raise DataError(
                f"mask {str(mask_path)!r} holds class {int(out_of_range[0])} but num_classes is "
                f"{self.num_classes} (values 0..{self.num_classes - 1}, "
                f"{self.args.ignore_index} = ignore); raise num_classes or fix the mask"
            )
        mask = mask.masked_fill(ignored, IGNORE_INDEX)
        sample = normalize(image), mask
        size = self.args.size
        return sample if size is None else resize_sample(sample, size)

    def augment(self, sample: SegmentationSample, generator: torch.Generator) -> SegmentationSample:
        return random_scale_crop_flip(
            sample,
            generator,
            self.args.scale_range,
            self.args.hflip,
            crop_size=self.args.crop_size,
        )


@DATASETS.register("image_folder", args=ImageFolderArgs)
def build_image_folder(
    args: ImageFolderArgs, seed: int, *, prefix: str = DEFAULT_PREFIX
) -> DenseDataset:
    """Images with PNG class-index masks (Pascal VOC / Cityscapes layout) from a folder."""
    del seed  # the files fix the samples
    return ImageFolder(args, prefix)
