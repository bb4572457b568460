"""``/v1/models`` over a real job database and a real SQLite-backed MLflow registry.

Project ``acme`` owns one registered student (logged the way a worker logs it); ``globex`` must
not be able to see, read, download or re-alias it, and every such attempt is a 404.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from registry_testkit import register_a_student

from service.config import Settings
from service.db import make_engine, make_sessionmaker, upgrade_to_head
from service.main import create_app
from service.store import JobStore
from workers.publishing import RegisteredVersion

torch.set_num_threads(1)


@dataclass
class ModelsApi:
    http: TestClient
    acme: dict[str, str]
    globex: dict[str, str]
    version: RegisteredVersion
    weights: Path


@pytest.fixture(scope="module")
def models_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelsApi]:
    root = tmp_path_factory.mktemp("models-api")
    database_url = f"sqlite:///{root / 'maskd.db'}"
    upgrade_to_head(database_url)
    settings = Settings(
        database_url=database_url,
        broker_url="filesystem://",
        data_dir=root / "var",
        mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
    )
    version, weights = register_a_student(settings.mlflow_tracking_uri, root)
    engine = make_engine(database_url)
    store = JobStore(make_sessionmaker(engine))
    acme = {"Authorization": f"Bearer {store.create_api_key('acme')}"}
    globex = {"Authorization": f"Bearer {store.create_api_key('globex')}"}
    try:
        with TestClient(create_app(settings)) as http:
            yield ModelsApi(http, acme, globex, version, weights)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_project_lists_only_its_models(models_api: ModelsApi) -> None:
    mine = models_api.http.get("/v1/models", headers=models_api.acme)
    assert mine.status_code == 200
    assert [m["name"] for m in mine.json()["data"]] == ["acme.seg-small-student"]
    assert mine.json()["data"][0]["aliases"]["candidate"] == models_api.version.version
    theirs = models_api.http.get("/v1/models", headers=models_api.globex)
    assert theirs.status_code == 200
    assert theirs.json() == {"data": [], "count": 0}
    assert models_api.http.get("/v1/models").status_code == 401


@pytest.mark.slow
def test_version_details_carry_lineage_metrics_and_aliases(models_api: ModelsApi) -> None:
    name, number = models_api.version.name, models_api.version.version
    versions = models_api.http.get(f"/v1/models/{name}/versions", headers=models_api.acme)
    assert [v["version"] for v in versions.json()["data"]] == [number]

    by_alias = models_api.http.get(
        f"/v1/models/{name}/versions/@candidate", headers=models_api.acme
    )
    assert by_alias.status_code == 200
    detail = by_alias.json()
    assert detail["version"] == number
    assert detail["tags"]["maskd.job_id"] == "job-acme"
    assert detail["tags"]["maskd.project"] == "acme"
    assert detail["tags"]["maskd.arch"] == "seg_tiny_student"
    assert detail["metrics"]["student_miou"] == pytest.approx(0.25)
    assert detail["run_id"] and detail["experiment_id"]
    assert "candidate" in detail["aliases"]


@pytest.mark.slow
def test_weights_download_as_a_state_dict(models_api: ModelsApi) -> None:
    name, number = models_api.version.name, models_api.version.version
    response = models_api.http.get(
        f"/v1/models/{name}/versions/{number}/weights", headers=models_api.acme
    )
    assert response.status_code == 200
    assert response.content == models_api.weights.read_bytes()
    state = torch.load(io.BytesIO(response.content), weights_only=True)
    assert set(state) == set(torch.load(models_api.weights, weights_only=True))


@pytest.mark.slow
def test_users_move_the_champion_alias(models_api: ModelsApi) -> None:
    name, number = models_api.version.name, models_api.version.version
    moved = models_api.http.put(
        f"/v1/models/{name}/aliases/champion",
        json={"version": number},
        headers=models_api.acme,
    )
    assert moved.status_code == 200
    assert "champion" in moved.json()["aliases"]
    listed = models_api.http.get("/v1/models", headers=models_api.acme).json()["data"][0]
    assert listed["aliases"]["champion"] == number

    missing = models_api.http.put(
        f"/v1/models/{name}/aliases/champion", json={"version": "99"}, headers=models_api.acme
    )
    assert missing.status_code == 404
    reserved = models_api.http.put(
        f"/v1/models/{name}/aliases/latest", json={"version": number}, headers=models_api.acme
    )
    assert reserved.status_code == 422


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models/{name}/versions"),
        ("GET", "/v1/models/{name}/versions/{version}"),
        ("GET", "/v1/models/{name}/versions/{version}/weights"),
        ("PUT", "/v1/models/{name}/aliases/champion"),
    ],
)
def test_another_project_gets_404_for_everything(
    models_api: ModelsApi, method: str, path: str
) -> None:
    url = path.format(name=models_api.version.name, version=models_api.version.version)
    response = models_api.http.request(
        method, url, headers=models_api.globex, json={"version": models_api.version.version}
    )
    assert response.status_code == 404
    # A name that does not exist at all answers the same way.
    unknown = path.format(name="globex.nothing-student", version="1")
    assert (
        models_api.http.request(
            method, unknown, headers=models_api.globex, json={"version": "1"}
        ).status_code
        == 404
    )


@pytest.mark.slow
def test_jobs_take_teacher_weights_from_their_own_registry(models_api: ModelsApi) -> None:
    uri = f"models:/{models_api.version.name}@candidate"
    body = {
        "name": "from-registry",
        "teacher": {
            "arch": "seg_tiny_student",
            "args": {"base_channels": 4, "context_blocks": 0},
            "weights": uri,
            "layers": ["head"],
        },
        "student": {"arch": "seg_tiny_student", "layers": ["head"]},
        "dataset": {"args": {"num_samples": 4, "image_size": 32}},
        "stage1": {"iterations": 1},
        "stage2": {"iterations": 1},
        "batch_size": 2,
    }
    accepted = models_api.http.post("/v1/jobs", json=body, headers=models_api.acme)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["spec"]["teacher"]["weights"] == uri

    refused = models_api.http.post("/v1/jobs", json=body, headers=models_api.globex)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "teacher", "weights"]
