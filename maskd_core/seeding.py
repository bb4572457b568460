"""Seeds derived from tuples of integers, identical in every process and on every resume."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed for ``parts`` (e.g. job seed, step, position in the batch).

    ``seed + step`` style arithmetic makes neighbouring (seed, step) pairs collide; hashing the
    whole tuple through numpy's ``SeedSequence`` does not, and unlike ``hash()`` it does not
    change between Python processes.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """The splitmix64 finaliser: a cheap bijective scramble of 64-bit integers."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class SeededPermutation:
    """A pseudo-random permutation of ``range(length)`` computed position by position.

    ``torch.randperm`` would hold every index in memory, which defeats datasets generated
    lazily at any size (a billion samples would take 8 GB per epoch). Here a four-round
    Feistel network permutes the smallest even-bit-width range covering ``length``, and values
    that land outside ``range(length)`` are encrypted again until they fall inside ("cycle
    walking"), which keeps the map a bijection on ``range(length)``. Memory is O(1) and each
    lookup costs a few integer operations.
    """

    _ROUNDS = 4

    def __init__(self, length: int, *seed_parts: int) -> None:
        if length < 1:
            raise ValueError(f"a permutation needs a positive length, got {length}")
        self.length = length
        bits = max(2, (length - 1).bit_length())
        self._half_bits = (bits + 1) // 2
        self._half_mask = (1 << self._half_bits) - 1
        self._keys = [derive_seed(*seed_parts, round_) for round_ in range(self._ROUNDS)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> int:
        if not 0 <= position < self.length:
            raise IndexError(f"position {position} of a permutation of {self.length}")
        value = self._encrypt(position)
        while value >= self.length:
            value = self._encrypt(value)
        return value

    def _encrypt(self, value: int) -> int:
        left, right = value >> self._half_bits, value & self._half_mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._half_mask)
        return (left << self._half_bits) | right
