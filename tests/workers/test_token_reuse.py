"""The stage-1 fingerprint: what makes two jobs' tokens interchangeable, and what does not."""

from __future__ import annotations

from typing import Any

from maskd_core.spec import JobSpec
from workers.token_reuse import stage1_fingerprint

# What this spec fingerprinted to before val_dataset existed (checked against that code).
FINGERPRINT_WITHOUT_VAL_DATASET = "ce2d12e10bb1f73c715ca5e8ac61b1d80d47b5622f1b5f07681ee2488c95bfe8"


def spec(**changes: Any) -> JobSpec:
    data: dict[str, Any] = {
        "teacher": {"arch": "seg_tiny_teacher", "layers": ["head"]},
        "student": {"arch": "seg_tiny_student", "layers": ["head"]},
        "dataset": {"name": "procedural_shapes", "args": {"num_samples": 8, "image_size": 32}},
        "stage1": {"iterations": 2},
        "stage2": {"iterations": 2},
    }
    return JobSpec.model_validate({**data, **changes})


def test_a_validation_dataset_changes_the_fingerprint_and_its_absence_does_not() -> None:
    """With ``val_dataset`` stage 1 learns on all of the training data, without it on the
    part ``val_fraction`` leaves: not the same tokens."""
    split = stage1_fingerprint(spec())
    separate = stage1_fingerprint(spec(val_dataset={"args": {"num_samples": 4, "image_size": 32}}))
    other = stage1_fingerprint(spec(val_dataset={"args": {"num_samples": 6, "image_size": 32}}))
    assert len({split, separate, other}) == 3
    # Jobs without one keep the fingerprint they had before the field existed, so the tokens
    # earlier jobs left stay reusable.
    assert split == FINGERPRINT_WITHOUT_VAL_DATASET
