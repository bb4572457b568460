"""Generated detection data: flat shapes on a noisy background, with exact boxes.

It is the embedded default of the detection task and what its tests and quickstart train on:
it needs no files, is the same for the same ``(seed, index)`` in any process, and a small
detector learns it in a few hundred CPU steps. Each class is a shape (rectangle, disc, triangle,
ring, plus sign) drawn in a random colour, so the class has to be read from the outline, not
from the colour. Objects never overlap, so every box is the tight box of the visible pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskd_core.data import DATASETS, DEFAULT_PREFIX
from maskd_core.data.detection_common import DetectionDataset, DetectionSample, as_targets

ShapeMask = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``mask(u, v)`` over pixel centres in box coordinates ``u, v`` in [0, 1]: is it inside?"""


def _rectangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.ones_like(u, dtype=bool)


def _disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.asarray((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Apex at the top centre, base along the bottom edge.
    return np.asarray(np.abs(u - 0.5) <= 0.5 * v)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    radius2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
    return np.asarray((radius2 <= 0.25) & (radius2 >= 0.09))


def _plus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.asarray((np.abs(u - 0.5) <= 0.17) | (np.abs(v - 0.5) <= 0.17))


SHAPES: tuple[tuple[str, ShapeMask], ...] = (
    ("rectangle", _rectangle),
    ("disc", _disc),
    ("triangle", _triangle),
    ("ring", _ring),
    ("plus", _plus),
)


class ProceduralBoxesArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(default=512, gt=0, description="Images in the dataset.")
    num_classes: int = Field(
        default=3,
        ge=1,
        le=len(SHAPES),
        description="Shapes used, in order: rectangle, disc, triangle, ring, plus.",
    )
    image_size: int = Field(default=128, ge=32, le=2048, description="Image height and width.")
    vary_size: bool = Field(
        default=False,
        description="Draw each image's height and width from [3/4 image_size, image_size].",
    )
    max_objects: int = Field(default=4, ge=1, le=32, description="At most this many objects.")
    min_object_size: int = Field(default=16, ge=4, description="Smallest box side in pixels.")
    max_object_size: int = Field(default=48, ge=4, description="Largest box side in pixels.")

    @model_validator(mode="after")
    def _objects_fit(self) -> ProceduralBoxesArgs:
        smallest_image = self.image_size * 3 // 4 if self.vary_size else self.image_size
        if self.min_object_size > self.max_object_size:
            raise ValueError(
                f"min_object_size ({self.min_object_size}) is larger than max_object_size "
                f"({self.max_object_size})"
            )
        if self.max_object_size > smallest_image:
            raise ValueError(
                f"max_object_size ({self.max_object_size}) does not fit in the smallest image "
                f"({smallest_image} px); lower it or raise image_size"
            )
        return self


class ProceduralBoxes(DetectionDataset):
    """``num_samples`` images generated on demand from ``(seed, index)``."""

    def __init__(self, args: ProceduralBoxesArgs, seed: int) -> None:
        self.args = args
        self.seed = seed
        self.num_classes = args.num_classes

    def __len__(self) -> int:
        return self.args.num_samples

    def __getitem__(self, index: int) -> DetectionSample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        rng = np.random.default_rng([self.seed, index])
        args = self.args
        if args.vary_size:
            low = args.image_size * 3 // 4
            height, width = (int(s) for s in rng.integers(low, args.image_size + 1, size=2))
        else:
            height = width = args.image_size
        background = rng.uniform(0.1, 0.9, size=3)
        image = np.broadcast_to(background[:, None, None], (3, height, width)).copy()
        boxes: list[tuple[float, float, float, float]] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(1, args.max_objects + 1))):
            placed = self._place(rng, height, width, boxes)
            if placed is None:
                continue
            top, left, box_h, box_w = placed
            label = int(rng.integers(1, args.num_classes + 1))
            v, u = np.meshgrid(
                (np.arange(box_h) + 0.5) / box_h, (np.arange(box_w) + 0.5) / box_w, indexing="ij"
            )
            mask = SHAPES[label - 1][1](u, v)
            rows, cols = np.nonzero(mask)
            colour = _contrasting_colour(rng, background)
            region = image[:, top : top + box_h, left : left + box_w]
            region[:, mask] = colour[:, None]
            boxes.append(
                (
                    float(left + cols.min()),
                    float(top + rows.min()),
                    float(left + cols.max() + 1),
                    float(top + rows.max() + 1),
                )
            )
            labels.append(label)
        image += rng.normal(0.0, 0.03, size=image.shape)
        tensor = torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32))
        box_tensor, label_tensor = as_targets(boxes, labels)
        return DetectionSample(tensor, box_tensor, label_tensor)

    def _place(
        self,
        rng: np.random.Generator,
        height: int,
        width: int,
        taken: list[tuple[float, float, float, float]],
    ) -> tuple[int, int, int, int] | None:
        """A free spot ``(top, left, h, w)`` at least 2 px from every placed box, or none."""
        args = self.args
        for _ in range(20):
            box_h, box_w = (
                int(s) for s in rng.integers(args.min_object_size, args.max_object_size + 1, 2)
            )
            top = int(rng.integers(0, height - box_h + 1))
            left = int(rng.integers(0, width - box_w + 1))
            if all(
                left + box_w + 2 <= x1 or x2 + 2 <= left or top + box_h + 2 <= y1 or y2 + 2 <= top
                for x1, y1, x2, y2 in taken
            ):
                return top, left, box_h, box_w
        return None


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour at least 0.25 away from the background on average, so every shape is visible."""
    while True:
        colour = rng.uniform(0.0, 1.0, size=3)
        if float(np.abs(colour - background).mean()) >= 0.25:
            return colour


@DATASETS.register("procedural_boxes", args=ProceduralBoxesArgs)
def build(args: ProceduralBoxesArgs, seed: int, *, prefix: str = DEFAULT_PREFIX) -> ProceduralBoxes:
    """Generated shapes with exact boxes: the detection default, needs no files."""
    del prefix  # generated data has no argument a build can fail on
    return ProceduralBoxes(args, seed)
