"""What a task (segmentation, detection) provides to the two MasKD stages.

The stages are task-agnostic: they tap named modules, so all they need from a task is how to
batch samples, run a model to get its training loss, run a teacher forward whose taps are read,
and evaluate. A task is registered by name in ``TASKS`` and looked up from ``JobSpec.task``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

Batch = Any
"""A task's batch as its ``collate`` makes it (segmentation: ``(images, masks)`` tensors)."""


class Task(ABC):
    """A dense-prediction task, as seen by the stages."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    """The metric that says how good a model is (``miou``, ``map``); higher is better."""

    @abstractmethod
    def collate(self, samples: Sequence[Any]) -> Batch:
        """Turn dataset samples into one batch (the ``collate_fn`` of the DataLoader)."""

    @abstractmethod
    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """Move a batch to ``device``."""

    @abstractmethod
    def batch_size(self, batch: Batch) -> int:
        """Number of images in a batch (for images/second)."""

    @abstractmethod
    def training_loss(
        self, model: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward ``model`` on ``batch`` and return its own task loss plus named components.

        Stage 1 calls it on the teacher with taps replacing features by masked ones (so the
        loss trains the tokens); stage 2 calls it on the student.
        """

    @abstractmethod
    def forward(self, model: nn.Module, batch: Batch) -> None:
        """Run the forward pass whose tapped outputs stage 2 reads (the teacher, under no_grad)."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, batches: Iterable[Batch], device: torch.device
    ) -> dict[str, float]:
        """Evaluate ``model`` (left in eval mode by the caller) and return metrics, including
        ``primary_metric``."""

    @abstractmethod
    def example_input(self, batch: Batch) -> torch.Tensor:
        """A tensor input the model accepts, for dry runs and model signatures."""
