"""The train/val split and step-indexed, deterministic batching.

A job validates on its ``val_dataset`` when the spec gives one (the dataset's own validation
split); only without it is the training dataset split at random by ``dataset.val_fraction``
(``train_val_split``).

The batch of global step ``k`` depends only on ``(seed, k)``:

- sample position ``p = k * batch_size + j`` falls in epoch ``e = p // len(dataset)``;
- epoch ``e`` visits the dataset in a permutation drawn from a generator seeded with
  ``(seed, e)``;
- sample ``j`` of step ``k`` is augmented with a generator seeded with ``(seed, k, j)``.

So a run resumed at step ``k`` sees exactly the batches ``k, k+1, ...`` of an uninterrupted run,
with any number of loader workers, and no sampler or RNG state has to be checkpointed.

A job on N processes (``maskd_core.distributed``) draws the same global batches: rank ``r``
takes samples ``j`` with ``r * B/N <= j < (r+1) * B/N`` of each. This does what
``DistributedSampler`` does (disjoint shards, an order reseeded every epoch) while keeping the
global batch of a step independent of N, so a checkpoint written at N processes resumes at M
on the very batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from maskd_core.data import build_val_dataset
from maskd_core.data.base import DenseDataset
from maskd_core.errors import SpecError
from maskd_core.seeding import SeededPermutation, derive_seed
from maskd_core.spec import JobSpec
from maskd_core.tasks.base import Batch, Task

_SPLIT_STREAM = 0
_EPOCH_STREAM = 1
_AUGMENT_STREAM = 2
"""Distinct first seed parts, so the split, the epoch order and the augmentations never share
a generator even when their other parts coincide."""


class DatasetSubset(DenseDataset):
    """Positions ``start <= p < stop`` of a seeded permutation of ``base``, augmented the way
    ``base`` augments. Holds no index list, so splitting a lazily generated dataset of any size
    costs nothing."""

    def __init__(
        self, base: DenseDataset, permutation: SeededPermutation, start: int, stop: int
    ) -> None:
        self.base = base
        self.permutation = permutation
        self.start = start
        self.stop = stop
        self.num_classes = base.num_classes
        self.class_names = base.class_names

    # A subset's task is its base's, known per instance rather than per class.
    @property
    def task(self) -> str:  # type: ignore[override]
        return self.base.task

    def base_index(self, index: int) -> int:
        """The index in ``base`` of this subset's sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a subset of {len(self)}")
        return self.permutation[self.start + index]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        return self.base[self.base_index(index)]

    def augment(self, sample: Any, generator: torch.Generator) -> Any:
        return self.base.augment(sample, generator)


Splits = tuple[DenseDataset, DenseDataset]
"""A job's (training, validation) data."""


def train_val_split(spec: JobSpec, dataset: DenseDataset) -> Splits:
    """The job's (train, val) data: all of ``dataset`` and the spec's ``val_dataset`` when it
    gives one, else ``dataset`` split by ``dataset.val_fraction`` and the job seed."""
    if spec.val_dataset is not None:
        return dataset, build_val_dataset(spec, dataset)
    return split_dataset(dataset, spec.dataset.val_fraction, spec.seed)


def split_dataset(
    dataset: DenseDataset, val_fraction: float, seed: int
) -> tuple[DatasetSubset, DatasetSubset]:
    """Split into (train, val) by a permutation drawn from ``seed``.

    Both parts get at least one sample; a dataset too small for that is a ``SpecError``. The
    fallback of a job without ``val_dataset``: samples that overlap (tiles of one image) land on
    both sides, so a dataset's own validation split is the better choice where it has one.
    """
    total = len(dataset)
    if total < 2:
        raise SpecError(
            f"the dataset has {total} sample(s); a train/val split needs at least 2",
            field="dataset",
        )
    val_count = min(max(round(total * val_fraction), 1), total - 1)
    order = SeededPermutation(total, _SPLIT_STREAM, seed)
    return DatasetSubset(dataset, order, val_count, total), DatasetSubset(
        dataset, order, 0, val_count
    )


class _StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite batches of ``(dataset index, augmentation seed)`` from ``start_step`` on: the
    share ``positions`` of each global batch of ``batch_size`` samples."""

    def __init__(
        self, length: int, batch_size: int, seed: int, start_step: int, positions: range
    ) -> None:
        self.length = length
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.positions = positions

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        order: SeededPermutation | None = None
        order_epoch = 0
        while True:
            batch = []
            for position in self.positions:
                epoch, offset = divmod(step * self.batch_size + position, self.length)
                if order is None or epoch != order_epoch:
                    order = SeededPermutation(self.length, _EPOCH_STREAM, self.seed, epoch)
                    order_epoch = epoch
                sample_seed = derive_seed(_AUGMENT_STREAM, self.seed, step, position)
                batch.append((order[offset], sample_seed))
            yield batch
            step += 1


class _AugmentedView(Dataset[Any]):
    """Looks samples up by ``(index, augmentation seed)`` so workers need no RNG of their own."""

    def __init__(self, dataset: DenseDataset, augment: bool) -> None:
        self.dataset = dataset
        self.augment = augment

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, sample_seed = key
        sample = self.dataset[index]
        if self.augment:
            sample = self.dataset.augment(sample, torch.Generator().manual_seed(sample_seed))
        return sample


class _PlainView(Dataset[Any]):
    def __init__(self, dataset: DenseDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def _private_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from this instead of the global RNG.

    Otherwise every new loader iterator (a resume, each evaluation) would advance the global
    RNG that dropout and initialisation draw from, and a resumed run would drift from an
    uninterrupted one. Nothing here uses the base seed: samples carry their own seeds.
    """
    return torch.Generator().manual_seed(0)


def train_batches(
    dataset: DenseDataset,
    task: Task,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_workers: int = 0,
    augment: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Endless training batches for steps ``start_step, start_step + 1, ...`` (see module doc):
    rank ``rank``'s share of each global batch of ``batch_size`` when ``world_size`` processes
    train (``batch_size`` divides by it; the spec checks).

    Stop iterating (or ``close()`` the iterator) to shut the loader workers down.
    """
    if len(dataset) == 0:
        raise SpecError("the training split is empty", field="dataset")
    share = batch_size // world_size
    positions = range(rank * share, (rank + 1) * share)
    loader: DataLoader[Any] = DataLoader(
        _AugmentedView(dataset, augment),
        batch_sampler=_StepBatchSampler(len(dataset), batch_size, seed, start_step, positions),
        num_workers=num_workers,
        collate_fn=task.collate,
        generator=_private_generator(),
    )
    yield from loader


def val_batches(
    dataset: DenseDataset, task: Task, batch_size: int, num_workers: int = 0
) -> Iterable[Batch]:
    """Un-augmented batches in dataset order; iterate it once per evaluation."""
    return DataLoader(
        _PlainView(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=task.collate,
        generator=_private_generator(),
    )
