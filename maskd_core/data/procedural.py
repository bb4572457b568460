"""``procedural_shapes``: generated images of shapes with exact per-pixel labels.

It is the default dataset: no files and no downloads, yet a real segmentation problem. Each
class is a shape kind (disc, rectangle, triangle, ring, ...; beyond nine classes also a fill
pattern), while colours are drawn independently of the class and the background is a textured,
noisy blend of two random colours. A model therefore has to use shape rather than colour, which
a tiny student learns more slowly than a wider teacher: room for distillation to help.

Sample ``i`` is generated on demand from ``(seed, i)`` alone, so the dataset costs nothing to
build at any size and is identical in every worker process.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F

from maskd_core.data import DATASETS, DEFAULT_PREFIX
from maskd_core.data.base import DenseDataset
from maskd_core.data.transforms import (
    ScaleRange,
    SegmentationSample,
    normalize,
    random_scale_crop_flip,
)
from maskd_core.seeding import generator_for

SHAPE_KINDS = (
    "disc",
    "rectangle",
    "triangle",
    "ring",
    "cross",
    "diamond",
    "hexagon",
    "hexagram",
    "half_disc",
)
FILL_PATTERNS = ("solid", "stripes", "checker")
MAX_CLASSES = 1 + len(SHAPE_KINDS) * len(FILL_PATTERNS)
"""Background plus every (fill pattern, shape kind) pair."""


def class_appearance(class_index: int) -> tuple[str, str]:
    """``(shape kind, fill pattern)`` of foreground class ``class_index`` (1-based).

    Shape kinds come first so that the default five classes are four solid shapes.
    """
    position = class_index - 1
    return SHAPE_KINDS[position % len(SHAPE_KINDS)], FILL_PATTERNS[position // len(SHAPE_KINDS)]


def _inside_regular_polygon(
    dx: torch.Tensor, dy: torch.Tensor, radius: float, angle: float, sides: int
) -> torch.Tensor:
    apothem = radius * math.cos(math.pi / sides)
    inside = torch.ones(dy.shape[0], dx.shape[1], dtype=torch.bool)
    for side in range(sides):
        normal = angle + 2 * math.pi * side / sides
        inside &= dx * math.cos(normal) + dy * math.sin(normal) <= apothem
    return inside


def shape_mask(
    kind: str,
    size: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    angle: float,
) -> torch.Tensor:
    """Pixels (by their centres) inside a shape: a bool ``[H, W]`` tensor.

    ``centre`` is ``(x, y)`` in pixels, ``radius`` the shape's outer radius and ``angle`` its
    rotation in radians. Hard edges, so the label of every pixel is exact.
    """
    height, width = size
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    cos, sin = math.cos(angle), math.sin(angle)
    u = dx * cos + dy * sin  # coordinates in the shape's own rotated frame
    v = -dx * sin + dy * cos
    distance_sq = dx * dx + dy * dy
    if kind == "disc":
        return distance_sq <= radius**2
    if kind == "rectangle":
        return (u.abs() <= radius) & (v.abs() <= 0.55 * radius)
    if kind == "triangle":
        return _inside_regular_polygon(dx, dy, radius, angle, 3)
    if kind == "ring":
        return (distance_sq <= radius**2) & (distance_sq >= (0.55 * radius) ** 2)
    if kind == "cross":
        arm = radius / 3
        return ((u.abs() <= radius) & (v.abs() <= arm)) | ((u.abs() <= arm) & (v.abs() <= radius))
    if kind == "diamond":
        return u.abs() / radius + v.abs() / (0.6 * radius) <= 1.0
    if kind == "hexagon":
        return _inside_regular_polygon(dx, dy, radius, angle, 6)
    if kind == "hexagram":
        return _inside_regular_polygon(dx, dy, radius, angle, 3) | _inside_regular_polygon(
            dx, dy, radius, angle + math.pi / 3, 3
        )
    if kind == "half_disc":
        return (distance_sq <= radius**2) & (v >= 0)
    raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(SHAPE_KINDS)}")


def _fill_pattern(pattern: str, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A bool ``[H, W]`` map choosing between a shape's two colours (all True for solid)."""
    height, width = size
    if pattern == "solid":
        return torch.ones(height, width, dtype=torch.bool)
    period = 3.0 + 3.0 * float(torch.rand((), generator=generator))
    angle = math.pi * float(torch.rand((), generator=generator))
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, -1)
    along = torch.floor((xs * math.cos(angle) + ys * math.sin(angle)) / period)
    if pattern == "stripes":
        return along.remainder(2) == 0
    across = torch.floor((-xs * math.sin(angle) + ys * math.cos(angle)) / period)
    return (along + across).remainder(2) == 0


def _smooth_noise(size: tuple[int, int], cells: int, generator: torch.Generator) -> torch.Tensor:
    """A ``[1, H, W]`` field in [0, 1] varying over about ``cells`` blobs per side."""
    grid = torch.rand(1, 1, cells, cells, generator=generator)
    return F.interpolate(grid, size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _random_colour(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(3, 1, 1, generator=generator)


def generate_sample(
    generator: torch.Generator,
    image_size: int,
    num_classes: int,
    max_shapes: int,
    noise_std: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(image in [0, 1] [3, H, W], labels int64 [H, W])`` pair; later shapes occlude
    earlier ones in both the image and the labels."""
    size = (image_size, image_size)
    blend = _smooth_noise(size, 4, generator)
    image = blend * _random_colour(generator) + (1 - blend) * _random_colour(generator)
    image = image + 0.25 * (_smooth_noise(size, 12, generator) - 0.5)
    labels = torch.zeros(size, dtype=torch.int64)

    shape_count = int(torch.randint(1, max_shapes + 1, (), generator=generator))
    for _ in range(shape_count):
        class_index = int(torch.randint(1, num_classes, (), generator=generator))
        kind, pattern = class_appearance(class_index)
        uniform = torch.rand(4, generator=generator).tolist()
        radius = image_size * (0.1 + 0.14 * uniform[0])
        centre = (image_size * (0.1 + 0.8 * uniform[1]), image_size * (0.1 + 0.8 * uniform[2]))
        inside = shape_mask(kind, size, centre, radius, 2 * math.pi * uniform[3])
        colour = _random_colour(generator)
        # The second colour is the first shifted half-way round each channel, so stripes and
        # checks are always visible whatever the first colour is.
        fill = torch.where(
            _fill_pattern(pattern, size, generator), colour, (colour + 0.5).remainder(1.0)
        )
        image = torch.where(inside, fill, image)
        labels[inside] = class_index

    image = image + noise_std * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1), labels


class ProceduralShapesArgs(BaseModel):
    """Arguments of ``procedural_shapes``."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(default=512, ge=2, le=1_000_000_000)
    image_size: int = Field(default=64, ge=16, le=1024, description="Square side in pixels.")
    num_classes: int = Field(
        default=5,
        ge=2,
        le=MAX_CLASSES,
        description="Including background 0. Classes 1-9 are solid shape kinds, 10-18 the "
        "same kinds striped, 19-27 checked.",
    )
    max_shapes: int = Field(default=4, ge=1, le=32, description="Shapes per image (1 to this).")
    noise_std: float = Field(default=0.06, ge=0.0, le=1.0, description="Pixel noise in [0, 1].")
    scale_range: ScaleRange = Field(
        default=(0.75, 1.5), description="Random rescale factors of the training augmentation."
    )
    hflip: bool = Field(default=True, description="Random horizontal flips when augmenting.")
    data_seed: int | None = Field(
        default=None,
        ge=0,
        description="Generate the images from this seed instead of the job seed, so that jobs "
        "with different seeds share one dataset.",
    )


class ProceduralShapes(DenseDataset):
    """Lazily generated shapes; see the module docstring."""

    task = "segmentation"

    def __init__(self, args: ProceduralShapesArgs, seed: int) -> None:
        self.args = args
        self.seed = seed if args.data_seed is None else args.data_seed
        self.num_classes = args.num_classes

    def __len__(self) -> int:
        return self.args.num_samples

    def __getitem__(self, index: int) -> SegmentationSample:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a dataset of {len(self)}")
        image, labels = generate_sample(
            generator_for(self.seed, index),
            self.args.image_size,
            self.args.num_classes,
            self.args.max_shapes,
            self.args.noise_std,
        )
        return normalize(image), labels

    def augment(self, sample: SegmentationSample, generator: torch.Generator) -> SegmentationSample:
        return random_scale_crop_flip(sample, generator, self.args.scale_range, self.args.hflip)


@DATASETS.register("procedural_shapes", args=ProceduralShapesArgs)
def build_procedural_shapes(
    args: ProceduralShapesArgs, seed: int, *, prefix: str = DEFAULT_PREFIX
) -> DenseDataset:
    """Generated shapes with exact labels (no files needed); the default dataset."""
    del prefix  # generated data has no argument a build can fail on
    return ProceduralShapes(args, seed)
