"""A student in a real MLflow registry, registered the way a worker registers it.

Shared by the tests of ``/v1/models`` and of ``maskd models``; kept out of ``service_testkit``
so the tests that need no MLflow do not import it (and torch) for nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from maskd_core.callbacks import EVAL, STAGE2
from maskd_core.models import build_model, model_document
from maskd_core.runner import StudentRun
from maskd_core.spec import JobSpec
from maskd_core.workdir import WorkDir
from workers.publishing import RegisteredVersion, register_student
from workers.tracking import job_tracker


def register_a_student(tracking_uri: str, root: Path) -> tuple[RegisteredVersion, Path]:
    """Project acme's student ``acme.seg-small-student``, version 1, and its weights file."""
    spec = JobSpec.model_validate(
        {
            "name": "seg-small",
            "teacher": {"arch": "seg_tiny_teacher", "layers": ["head"]},
            "student": {
                "arch": "seg_tiny_student",
                "args": {"base_channels": 4, "context_blocks": 0},
                "layers": ["head"],
            },
            "dataset": {"args": {"num_samples": 4, "image_size": 32}},
            "stage1": {"iterations": 1},
            "stage2": {"iterations": 1},
        }
    )
    workdir = WorkDir(root / "job").create()
    torch.save(build_model(spec.student, 5).state_dict(), workdir.student)
    workdir.model_spec.write_text(json.dumps(model_document(spec.student, 5, spec.task)))
    tracker = job_tracker(tracking_uri, "acme", "job-acme", spec, root / "mlartifacts")
    tracker.on_eval(EVAL, 1, {"student_miou": 0.25})
    student = StudentRun(spec, STAGE2, workdir, {"metrics": {"student_miou": 0.25}})
    version = register_student(tracking_uri, tracker.run_id, "acme", student, 5, None)
    tracker.finish()
    return version, workdir.student
