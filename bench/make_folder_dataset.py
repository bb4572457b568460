"""Write the procedural shapes to disk as an ``image_folder`` dataset with its own val split.

The data behind ``bench/specs/segmentation-folder.yaml``: a standard on-disk layout read the way
a user's Pascal VOC or Cityscapes export is (files listed, PNGs decoded, palette masks), rather
than samples generated in memory, and a validation split of its own instead of a random
``val_fraction`` of the training samples. Nothing is downloaded: every sample comes from
``maskd_core.data.procedural.generate_sample``.

::

    OUT/images/train/000000.png   RGB, OUT/masks/train/000000.png   palette PNG, value = class
    OUT/images/val/000000.png          OUT/masks/val/000000.png

Train and val are drawn from different data seeds, so no validation image is one the students
trained on. Training sample ``i`` is sample ``i`` of ``procedural_shapes`` with
``data_seed: TRAIN_SEED`` (to 8-bit rounding). ``OUT/classes.txt`` names the classes, one per
line, background first. Rerunning into a non-empty folder is refused rather than mixing sets.

    OMP_NUM_THREADS=1 .venv/bin/python bench/make_folder_dataset.py runs/shapes-folder
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskd_core.data.procedural import MAX_CLASSES, class_appearance, generate_sample
from maskd_core.seeding import generator_for

SPLITS = ("train", "val")
NOISE_STD = 0.06
"""``procedural_shapes``' default pixel noise."""
MAX_SHAPES = 4
"""``procedural_shapes``' default shapes per image."""


def class_names(num_classes: int) -> list[str]:
    """``background`` then each class's shape kind, with its fill pattern unless solid."""
    names = ["background"]
    for class_index in range(1, num_classes):
        kind, pattern = class_appearance(class_index)
        names.append(kind if pattern == "solid" else f"{pattern}_{kind}")
    return names


def palette() -> list[int]:
    """Pascal VOC's 256-colour palette (each index's bits spread over R, G and B from the high
    bit down), so the masks look like VOC's in an image viewer; the reader uses the indices."""
    colours: list[int] = []
    for index in range(256):
        rgb = [0, 0, 0]
        value = index
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        colours.extend(rgb)
    return colours


def write_split(
    out: Path, split: str, count: int, data_seed: int, image_size: int, num_classes: int
) -> None:
    """``count`` image/mask pairs of ``split``, sample ``i`` generated from ``(data_seed, i)``."""
    images, masks = out / "images" / split, out / "masks" / split
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    colours = palette()
    for index in range(count):
        image, labels = generate_sample(
            generator_for(data_seed, index), image_size, num_classes, MAX_SHAPES, NOISE_STD
        )
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="RGB").save(images / f"{index:06d}.png")
        mask = Image.fromarray(labels.numpy().astype(np.uint8), mode="L").convert("P")
        mask.putpalette(colours)
        mask.save(masks / f"{index:06d}.png")


def make_folder_dataset(
    out: Path,
    *,
    train: int = 512,
    val: int = 128,
    image_size: int = 64,
    num_classes: int = 5,
    train_seed: int = 0,
    val_seed: int = 1,
) -> None:
    """Write the dataset under ``out``, which must be missing or empty (see the module doc)."""
    if train_seed == val_seed:
        raise ValueError("train and val need different data seeds, or val repeats train's images")
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be 2..{MAX_CLASSES} (background included)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; remove it or name another folder")
    out.mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train", train, train_seed), ("val", val, val_seed)):
        write_split(out, split, count, seed, image_size, num_classes)
    (out / "classes.txt").write_text("\n".join(class_names(num_classes)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to create (missing or empty)")
    parser.add_argument("--train", type=int, default=512, help="training images")
    parser.add_argument("--val", type=int, default=128, help="validation images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=5, help="background included")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--val-seed", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()
    make_folder_dataset(
        args.out,
        train=args.train,
        val=args.val,
        image_size=args.image_size,
        num_classes=args.num_classes,
        train_seed=args.train_seed,
        val_seed=args.val_seed,
    )
    print(
        f"{args.out}: {args.train} train + {args.val} val images of {args.image_size} px, "
        f"{args.num_classes} classes, {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
