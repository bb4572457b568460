"""Per-stage checkpoints that a resumed run continues from exactly.

A checkpoint holds the stage's trainable modules (parameters and buffers), the optimiser, the
grad scaler, every RNG the loop touches and the global step. The LR schedule is a function of
the step (``maskd_core.optim.lr_at``), so the step is its whole state. Everything is stored as
tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it: a checkpoint
never unpickles code. Writes go to a temporary file renamed into place, so a crash mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskd_core.files import atomic_write

CHECKPOINT_FORMAT = "maskd-checkpoint/1"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through ``maskd_core.files.atomic_write``."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and ``random`` states as tensors and plain values."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True always gives the MT19937 tuple
    np_key, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": np_key,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["key"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    py_state = state["python"]
    random.setstate(
        (py_state["version"], tuple(int(v) for v in py_state["internal"]), py_state["gauss"])
    )


def save_checkpoint(
    path: str | Path,
    *,
    step: int,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Write the state a stage needs to continue after global step ``step``."""
    atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "modules": {name: module.state_dict() for name, module in modules.items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        },
        path,
    )


def load_checkpoint(
    path: str | Path,
    *,
    modules: Mapping[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> int:
    """Restore everything ``save_checkpoint`` wrote and return the step to continue from."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a {CHECKPOINT_FORMAT} checkpoint")
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    step: int = state["step"]
    return step
