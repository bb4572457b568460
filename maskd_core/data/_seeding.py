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
