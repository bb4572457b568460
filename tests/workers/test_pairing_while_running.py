"""A running job shows its pairing: the worker records it (``outputs.pairing``, an event, the
MLflow run's tag and ``pairing.json``) as soon as the attempt planned it, before the teacher's
evaluation and stage 1, so a job still in stage 1, and one cancelled there, have it.

``maskd.run_job``'s body runs in a thread of the test on PostgreSQL and a real MLflow; the job
is stored without the pairing a submission's dry run records, so what is read is the worker's.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import threading
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from mlflow.entities import Run
from worker_testkit import FAST_SETTINGS, tiny_spec, wait_for

from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.main import create_app
from service.mlflow_names import JOB_ID_TAG, PAIRING_ARTIFACT, PAIRING_TAG
from service.store import JobStore
from workers.tasks import execute_job

torch.set_num_threads(1)

# A real job trained and tracked.
pytestmark = pytest.mark.slow

PROJECT = "pairing-early"


def zero_config_spec() -> JobSpec:
    """``tiny_spec`` without layers, with a stage 1 long enough to be read while it runs."""
    body = tiny_spec()
    del body["teacher"]["layers"], body["student"]["layers"]
    body["stage1"] = {**body["stage1"], "iterations": 100_000}
    return JobSpec.model_validate(body)


def pairing_runs(client: MlflowClient, job_id: str) -> list[Run]:
    """The job's MLflow runs that carry the pairing tag."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'")
    return [run for run in runs if PAIRING_TAG in run.data.tags]


def test_a_job_in_stage1_shows_its_pairing_and_keeps_it_once_cancelled(
    migrated_postgres_url: str, mlflow_tracking_uri: str, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=migrated_postgres_url,
        broker_url="filesystem://",
        data_dir=tmp_path / "var",
        mlflow_tracking_uri=mlflow_tracking_uri,
        validation_processes=0,
        **FAST_SETTINGS,
    )
    spec = zero_config_spec()
    plan = validate_job(spec)
    engine = make_engine(migrated_postgres_url)
    store = JobStore(make_sessionmaker(engine))
    project = store.create_project(PROJECT)
    headers = {"Authorization": f"Bearer {store.create_api_key(PROJECT)}"}
    job, _ = store.create_job(project.id, spec)
    assert "pairing" not in job.outputs
    ended: dict[str, str] = {}
    worker = threading.Thread(
        target=lambda: ended.setdefault("as", execute_job(store, settings, job.id, delivery="t"))
    )
    worker.start()
    try:
        with TestClient(create_app(settings)) as http:

            def in_stage1() -> dict[str, Any] | None:
                assert worker.is_alive(), f"the attempt ended early: {ended}"
                answer: dict[str, Any] = http.get(f"/v1/jobs/{job.id}", headers=headers).json()
                step = answer["progress"].get("stage1", {}).get("step", 0)
                return answer if answer["state"] == "STAGE1" and step > 0 else None

            running = wait_for(in_stage1, 120, "stage 1's first steps")
            assert running["outputs"]["pairing"] == plan.pairing()
            assert running["outputs"]["pairing"]["layers_from"]["student"] == "registry defaults"
            events = [event.message for event in store.list_events(project.id, job.id)]
            assert f"pairing: {plan.pairing_line()}" in events

            client = MlflowClient(mlflow_tracking_uri)
            [run] = pairing_runs(client, job.id)
            assert run.info.status == "RUNNING"
            assert run.data.tags[PAIRING_TAG] == plan.pairing_line()
            logged = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{PAIRING_ARTIFACT}")
            assert logged == plan.pairing()

            store.request_cancel(project.id, job.id)
            worker.join(timeout=120)
            cancelled = http.get(f"/v1/jobs/{job.id}", headers=headers).json()
    finally:
        if worker.is_alive():  # a failed check above: stop the job before leaving
            store.request_cancel(project.id, job.id)
            worker.join(timeout=120)
        engine.dispose()

    assert ended == {"as": "CANCELLED"}
    assert cancelled["state"] == "CANCELLED"
    assert cancelled["outputs"]["pairing"] == plan.pairing()
    assert cancelled["outputs"].get("model") is None, "never registered"
    [killed] = pairing_runs(client, job.id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags[PAIRING_TAG] == plan.pairing_line()
