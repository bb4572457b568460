"""Helpers of the MLflow tracking tests: a tiny job spec and its random teacher, and
``maskd.run_job``'s body on a fresh SQLite job store.

Shared by ``test_tracking.py`` and ``test_registry_tokens.py``, which each track their own
SQLite-backed MLflow (no mocks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from maskd_core.models import build_model
from maskd_core.spec import JobSpec
from service.config import Settings
from service.db import make_engine, make_sessionmaker, upgrade_to_head
from service.lifecycle import JobState
from service.store import EventRecord, JobRecord, JobStore
from workers.tasks import execute_job

PROJECT = "acme"


def tiny_spec(teacher_weights: Path, **changes: Any) -> JobSpec:
    """A job that trains in seconds on CPU; ``changes`` replace whole top-level sections."""
    data: dict[str, Any] = {
        "name": "tiny",
        "teacher": {
            "arch": "seg_tiny_teacher",
            "args": {"base_channels": 8, "context_blocks": 1},
            "weights": str(teacher_weights),
            "layers": ["head"],
        },
        "student": {
            "arch": "seg_tiny_student",
            "args": {"base_channels": 4, "context_blocks": 0},
            "layers": ["head"],
        },
        "dataset": {"args": {"num_samples": 12, "image_size": 32}},
        "stage1": {"tokens": 2, "iterations": 3},
        "stage2": {"iterations": 4},
        "batch_size": 4,
        "device": "cpu",
        "checkpoint_every": 100,
    }
    data.update(changes)
    return JobSpec.model_validate(data)


def save_random_teacher(root: Path) -> Path:
    """``root / "teacher.pt"``: the weights of an untrained ``tiny_spec`` teacher."""
    teacher = build_model(tiny_spec(root / "t.pt").teacher.model_copy(update={"weights": None}), 5)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    return root / "teacher.pt"


def sqlite_settings(tmp_path: Path, tracking_uri: str) -> Settings:
    """Settings of a fresh, migrated SQLite job store under ``tmp_path`` and the given MLflow."""
    database_url = f"sqlite:///{tmp_path / 'maskd.db'}"
    upgrade_to_head(database_url)
    return Settings(
        database_url=database_url, data_dir=tmp_path / "var", mlflow_tracking_uri=tracking_uri
    )


@contextmanager
def open_store(settings: Settings) -> Iterator[JobStore]:
    engine = make_engine(settings.database_url)
    try:
        yield JobStore(make_sessionmaker(engine))
    finally:
        engine.dispose()


def run_through_the_worker(
    settings: Settings, spec: JobSpec
) -> tuple[JobRecord, list[EventRecord]]:
    """``spec``, submitted by ``PROJECT``, run by ``maskd.run_job``'s body on ``settings``; the
    job, which SUCCEEDED, and its events."""
    with open_store(settings) as store:
        project = store.create_project(PROJECT)
        created, _ = store.create_job(project.id, spec)
        assert execute_job(store, settings, created.id, delivery="test") == "SUCCEEDED"
        record = store.get_job_unscoped(created.id)
        events = store.list_events(project.id, created.id)
    assert record is not None and record.state is JobState.SUCCEEDED
    return record, events
