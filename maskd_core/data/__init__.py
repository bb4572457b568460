"""Datasets by name, the train/val split and deterministic batching.

A dataset builder takes its validated argument model and the job seed and returns a
``DenseDataset``. Batching is step-indexed (see ``maskd_core.data.loader``): the batch of
global step k depends only on the seed and k, which is what makes a resumed run equal to an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maskd_core.data.base import DenseDataset
from maskd_core.registry import Registry

DatasetBuilder = Callable[[Any, int], DenseDataset]
"""``builder(args, seed) -> DenseDataset``."""

DATASETS: Registry[DatasetBuilder] = Registry("dataset")

__all__ = ["DATASETS", "DatasetBuilder", "DenseDataset"]

from maskd_core.data import coco as _coco  # noqa: E402,F401  (registers)
from maskd_core.data import folder as _folder  # noqa: E402,F401  (registers)
from maskd_core.data import procedural as _procedural  # noqa: E402,F401  (registers)
from maskd_core.data import procedural_boxes as _procedural_boxes  # noqa: E402,F401  (registers)
from maskd_core.data import voc as _voc  # noqa: E402,F401  (registers)
