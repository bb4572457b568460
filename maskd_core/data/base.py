"""The dataset interface the stages rely on."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch


class DenseDataset(ABC):
    """Indexable samples of one task, with augmentation driven by an explicit generator.

    Augmentation takes a ``torch.Generator`` instead of the global RNG, so the same
    (index, seed) gives the same sample in any process, on any resume.
    """

    task: ClassVar[str]
    """The task whose ``collate`` understands these samples."""

    num_classes: int

    class_names: dict[int, str] | None = None
    """Class id → name, for data that names its classes (VOC, COCO, a folder given names);
    ``None`` otherwise. A validation dataset must name every class as the training data does."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Any:
        """The un-augmented sample ``index``."""

    @abstractmethod
    def augment(self, sample: Any, generator: torch.Generator) -> Any:
        """A randomly augmented copy of ``sample`` (the usual flips, scales and crops)."""
