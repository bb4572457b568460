"""The frozen teacher's evaluations, kept in the job's work directory for resumed attempts.

The teacher never trains, so within a job its validation metrics (step 0) and those of the
teacher seen through the learned masks (the end of stage 1) are fixed numbers. Computing them
is a full pass over the validation data, which every resumed attempt used to pay again before
its first training step. Now the first attempt writes each evaluation to
``WorkDir.evaluation(name)`` (next to the stage checkpoints) and later attempts read it back.

A stored evaluation is used only when its key matches: the SHA-256 of everything its numbers
depend on (``evaluation_key``), the teacher's weights by content rather than by path, and for
the masked teacher the tokens file by content. The spec of a job never changes, so a mismatch
means something changed under the job between attempts (the weights file rewritten, another
device, a new maskd or torch); the evaluation is then computed again and rewritten, never
reused. Torch-free: it handles JSON and hashes only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from maskd_core.files import atomic_write_json, file_sha256
from maskd_core.spec import JobSpec

EVALUATION_FORMAT = "maskd-evaluation/1"

_NOT_SEEN_BY_THE_TEACHER = frozenset(
    {"name", "student", "stage2", "comparison", "num_workers", "eval_every", "checkpoint_every"}
)
"""Spec fields an evaluation of the teacher cannot depend on: the job's label, what comes
after stage 1, and settings that change neither the validation batches (they are the same for
any number of loader workers) nor the model. Every other field, including any added later,
is part of the key."""


def evaluation_key(
    spec: JobSpec,
    *,
    device: str,
    versions: Mapping[str, str],
    tokens: Path | None = None,
) -> str:
    """The SHA-256 that a stored evaluation must match to be read back.

    In: the spec without ``_NOT_SEEN_BY_THE_TEACHER``, with the teacher's weights file replaced
    by the SHA-256 of its content (a registry model is cached at a path that may differ from
    host to host); the device the job runs on; the library versions (``versions``); and, for
    the masked teacher, the SHA-256 of the ``tokens`` file.
    """
    described = spec.model_dump(mode="json", exclude=set(_NOT_SEEN_BY_THE_TEACHER))
    weights = spec.teacher.weights
    described["teacher"]["weights"] = file_sha256(weights) if weights is not None else None
    payload = {
        "format": EVALUATION_FORMAT,
        "spec": described,
        "device": device,
        "versions": dict(versions),
        "tokens_sha256": file_sha256(tokens) if tokens is not None else None,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_evaluation(path: Path, key: str) -> dict[str, float] | None:
    """The metrics stored at ``path`` under ``key``; None when there are none, they were stored
    under another key, or the file is not a whole evaluation (then it is recomputed)."""
    try:
        stored: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("format") != EVALUATION_FORMAT:
        return None
    metrics = stored.get("metrics")
    if stored.get("key") != key or not isinstance(metrics, dict):
        return None
    if not all(isinstance(value, int | float) for value in metrics.values()):
        return None
    return {str(name): float(value) for name, value in metrics.items()}


def save_evaluation(path: Path, key: str, metrics: Mapping[str, float]) -> None:
    """Store ``metrics`` under ``key``, atomically; floats go through JSON exactly (NaN too),
    so a value read back equals the one computed."""
    values = {name: float(value) for name, value in metrics.items()}
    atomic_write_json(path, {"format": EVALUATION_FORMAT, "key": key, "metrics": values})
