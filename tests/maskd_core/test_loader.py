"""Step-indexed batching: a resumed run sees exactly the batches of an uninterrupted one."""

from __future__ import annotations

from collections import Counter
from itertools import islice
from typing import Any

import pytest
import torch

from maskd_core.data import DATASETS, DenseDataset
from maskd_core.errors import SpecError
from maskd_core.loader import split_dataset, train_batches, val_batches
from maskd_core.seeding import SeededPermutation
from maskd_core.tasks import TASKS, Task

Batch = tuple[torch.Tensor, torch.Tensor]


def shapes(num_samples: int = 10) -> DenseDataset:
    args = DATASETS.parse_args("procedural_shapes", {"num_samples": num_samples, "image_size": 16})
    return DATASETS.get("procedural_shapes")(args, 0)


@pytest.fixture
def task() -> Task:
    return TASKS.get("segmentation")()


def take(dataset: DenseDataset, task: Task, steps: int, **kwargs: Any) -> list[Batch]:
    return list(islice(train_batches(dataset, task, 4, **kwargs), steps))


def assert_same(first: list[Batch], second: list[Batch]) -> None:
    assert len(first) == len(second)
    for (images_a, masks_a), (images_b, masks_b) in zip(first, second, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(masks_a, masks_b)


def test_split_is_a_seeded_partition() -> None:
    dataset = shapes(20)
    train, val = split_dataset(dataset, 0.25, seed=3)
    assert (len(train), len(val)) == (15, 5)
    train_indices = [train.base_index(i) for i in range(15)]
    val_indices = [val.base_index(i) for i in range(5)]
    assert sorted(train_indices + val_indices) == list(range(20))
    again, other = split_dataset(dataset, 0.25, seed=3)[1], split_dataset(dataset, 0.25, seed=4)[1]
    assert [again.base_index(i) for i in range(5)] == val_indices
    assert [other.base_index(i) for i in range(5)] != val_indices
    assert train.task == "segmentation" and train.num_classes == dataset.num_classes
    assert torch.equal(val[0][0], dataset[val_indices[0]][0])


@pytest.mark.parametrize("length", [1, 2, 3, 7, 64, 1000, 1025])
def test_seeded_permutation_is_a_bijection_that_depends_on_the_seed(length: int) -> None:
    orders = [[SeededPermutation(length, seed)[i] for i in range(length)] for seed in range(3)]
    for order in orders:
        assert sorted(order) == list(range(length))
    if length >= 7:
        assert orders[0] != orders[1] != orders[2]


def test_huge_datasets_split_and_batch_without_index_lists(task: Task) -> None:
    huge = DATASETS.get("procedural_shapes")(
        DATASETS.parse_args("procedural_shapes", {"num_samples": 10**9, "image_size": 16}), 0
    )
    train, val = split_dataset(huge, 0.2, seed=0)
    assert (len(train), len(val)) == (800_000_000, 200_000_000)
    images, _ = next(train_batches(train, task, 2, seed=0, start_step=10**8))
    assert images.shape == (2, 3, 16, 16)


def test_split_keeps_a_sample_on_each_side_and_refuses_one_sample() -> None:
    train, val = split_dataset(shapes(2), 0.01, seed=0)
    assert (len(train), len(val)) == (1, 1)
    with pytest.raises(SpecError, match="at least 2"):
        split_dataset(DatasetOfOne(), 0.5, seed=0)


class DatasetOfOne(DenseDataset):
    task = "segmentation"
    num_classes = 2

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Batch:
        return torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.int64)

    def augment(self, sample: Batch, generator: torch.Generator) -> Batch:
        return sample


def test_each_epoch_visits_every_sample_once(task: Task) -> None:
    dataset = shapes(6)
    seen: Counter[bytes] = Counter()
    for images, _ in take(dataset, task, 3, seed=0, augment=False):  # 12 samples = 2 epochs
        seen.update(image.numpy().tobytes() for image in images)
    assert len(seen) == 6 and set(seen.values()) == {2}


def test_batches_depend_on_the_seed(task: Task) -> None:
    dataset = shapes()
    assert_same(take(dataset, task, 3, seed=1), take(dataset, task, 3, seed=1))
    other = take(dataset, task, 1, seed=2)[0]
    assert not torch.equal(take(dataset, task, 1, seed=1)[0][0], other[0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_at_step_k_repeats_the_uninterrupted_run(task: Task, num_workers: int) -> None:
    dataset = shapes()  # 10 samples, batches of 4: steps 2 and 4 cross epoch boundaries
    uninterrupted = take(dataset, task, 6, seed=7)
    resumed = take(dataset, task, 3, seed=7, start_step=3, num_workers=num_workers)
    assert_same(uninterrupted[3:], resumed)


def test_augmentation_changes_samples_but_not_their_size(task: Task) -> None:
    dataset = shapes()
    plain = take(dataset, task, 2, seed=0, augment=False)
    augmented = take(dataset, task, 2, seed=0)
    assert augmented[0][0].shape == plain[0][0].shape == (4, 3, 16, 16)
    assert not torch.equal(augmented[0][0], plain[0][0])


def test_val_batches_are_plain_ordered_and_reiterable(task: Task) -> None:
    dataset = shapes(5)
    batches = val_batches(dataset, task, batch_size=2)
    first, second = list(batches), list(batches)
    assert [len(images) for images, _ in first] == [2, 2, 1]
    assert_same(first, second)
    assert torch.equal(first[2][0][0], dataset[4][0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loading_leaves_the_global_rng_alone(task: Task, num_workers: int) -> None:
    """Dropout and friends draw from the global RNG; starting a loader must not advance it."""
    dataset = shapes()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    take(dataset, task, 2, seed=0, num_workers=num_workers)
    list(val_batches(dataset, task, batch_size=4, num_workers=num_workers))
    assert torch.equal(torch.rand(3), expected)
