"""A published student's deployable exports over the API, the client's CLI and a real
SQLite-backed MLflow registry: real jobs trained, exported and registered as the worker does.

One job's ONNX and torch.export copies are accepted: they download through
``/v1/models/…/exports/{format}`` (and ``maskd models download --format onnx``) and run with the
same outputs as the PyTorch student. Another job asks for a tolerance no float kernel meets: it
still succeeds and registers its student, whose ONNX export is marked refused with the numbers,
and downloading it is a 404 that says so. Another project sees none of it.
"""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import io
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from fastapi.testclient import TestClient

from maskd_cli import main
from maskd_cli.demo import start_api_thread
from maskd_core.files import file_sha256
from maskd_core.models import build_from_document
from maskd_core.runner import JobResult, run_job
from maskd_core.spec import JobSpec
from service.config import Settings
from service.db import make_engine, make_sessionmaker, upgrade_to_head
from service.main import create_app
from service.mlflow_names import export_status_tag, latency_tag, speedup_tag
from service.store import JobStore
from workers.publishing import publish
from workers.tracking import job_tracker

pytestmark = pytest.mark.slow
torch.set_num_threads(1)


def job_spec(name: str, **export: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": name,
            "teacher": {"arch": "seg_tiny_teacher", "layers": ["head"]},
            "student": {
                "arch": "seg_tiny_student",
                "args": {"base_channels": 4, "context_blocks": 0},
                "layers": ["head"],
            },
            "dataset": {"args": {"num_samples": 8, "image_size": 32}},
            "stage1": {"tokens": 2, "iterations": 1},
            "stage2": {"iterations": 2},
            "batch_size": 4,
            "device": "cpu",
            "export": {"batches": 1, "latency_runs": 3, **export},
        }
    )


@dataclass
class Published:
    result: JobResult
    links: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.links["model"]["name"])

    def student(self) -> torch.nn.Module:
        workdir = self.result.runs[0].workdir
        return build_from_document(json.loads(workdir.model_spec.read_text()), workdir.student)


@dataclass
class ExportsApi:
    settings: Settings
    http: TestClient
    acme: dict[str, str]
    acme_key: str
    globex: dict[str, str]
    accepted: Published
    refused: Published


def run_and_publish(uri: str, root: Path, spec: JobSpec, job_id: str) -> Published:
    """What the worker does: run the job, track it, publish (export, register) its student."""
    tracker = job_tracker(uri, "acme", job_id, spec, root / "mlartifacts")
    result = run_job(spec, root / "jobs" / job_id, callbacks=[tracker])
    links = publish(result, tracker, uri)
    tracker.finish()
    return Published(result, links)


@pytest.fixture(scope="module")
def exports_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExportsApi]:
    root = tmp_path_factory.mktemp("models-exports")
    database_url = f"sqlite:///{root / 'maskd.db'}"
    upgrade_to_head(database_url)
    settings = Settings(
        database_url=database_url,
        broker_url="filesystem://",
        data_dir=root / "var",
        mlflow_tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
    )
    uri = settings.mlflow_tracking_uri
    accepted = run_and_publish(
        uri, root, job_spec("deployable", formats=["onnx", "torch_export"]), "job-ok"
    )
    refused = run_and_publish(uri, root, job_spec("too-strict", tolerance=0.0), "job-strict")
    engine = make_engine(database_url)
    store = JobStore(make_sessionmaker(engine))
    key = store.create_api_key("acme")
    globex = {"Authorization": f"Bearer {store.create_api_key('globex')}"}
    try:
        with TestClient(create_app(settings)) as http:
            yield ExportsApi(
                settings, http, {"Authorization": f"Bearer {key}"}, key, globex, accepted, refused
            )
    finally:
        engine.dispose()


def validation_images(published: Published) -> np.ndarray:
    example = published.result.input_example
    assert example is not None
    return example.astype(np.float32)


def test_the_onnx_export_downloads_and_runs_like_the_student(exports_api: ExportsApi) -> None:
    published = exports_api.accepted
    response = exports_api.http.get(
        f"/v1/models/{published.name}/versions/1/exports/onnx", headers=exports_api.acme
    )
    assert response.status_code == 200, response.text
    session = onnxruntime.InferenceSession(response.content)
    images = validation_images(published)

    (logits,) = session.run(None, {"images": images})

    with torch.no_grad():
        expected = published.student()(torch.from_numpy(images))["out"]
    assert np.abs(logits - expected.numpy()).max() <= 1e-4
    report = json.loads(published.result.runs[0].workdir.export_report.read_text())
    assert report["exports"]["onnx"]["sha256"] == file_sha256(
        published.result.runs[0].workdir.exported("onnx")
    )


def test_the_torch_export_downloads_and_runs_like_the_student(exports_api: ExportsApi) -> None:
    published = exports_api.accepted
    response = exports_api.http.get(
        f"/v1/models/{published.name}/versions/@candidate/exports/torch_export",
        headers=exports_api.acme,
    )
    assert response.status_code == 200, response.text
    program = torch.export.load(io.BytesIO(response.content)).module()
    images = torch.from_numpy(validation_images(published))
    with torch.no_grad():
        assert torch.allclose(program(images), published.student()(images)["out"], atol=1e-5)


def test_the_version_shows_parity_latency_and_speedup(exports_api: ExportsApi) -> None:
    name = exports_api.accepted.name
    version = exports_api.http.get(f"/v1/models/{name}/versions/1", headers=exports_api.acme)
    tags = version.json()["tags"]
    assert tags[export_status_tag("onnx")] == "accepted"
    assert tags[export_status_tag("torch_export")] == "accepted"
    assert float(tags[latency_tag("teacher")]) > 0
    assert float(tags[latency_tag("onnx")]) > 0
    assert float(tags[speedup_tag("student")]) > 0
    report = exports_api.http.get(f"/v1/models/{name}/versions/1/exports", headers=exports_api.acme)
    assert report.status_code == 200
    body = report.json()
    assert body["outputs"]["names"] == ["logits"]
    assert body["tolerance"] == 1e-3
    assert body["exports"]["onnx"]["max_abs_diff"] <= 1e-3
    assert set(body["latency_ms"]) == {"teacher", "student", "onnx", "torch_export"}


def test_a_refused_export_leaves_the_job_its_student_and_says_why(
    exports_api: ExportsApi,
) -> None:
    name = exports_api.refused.name
    version = exports_api.http.get(f"/v1/models/{name}/versions/1", headers=exports_api.acme)
    assert version.status_code == 200  # the PyTorch student is registered all the same
    assert version.json()["tags"][export_status_tag("onnx")] == "refused"
    weights = exports_api.http.get(
        f"/v1/models/{name}/versions/1/weights", headers=exports_api.acme
    )
    assert weights.status_code == 200

    missing = exports_api.http.get(
        f"/v1/models/{name}/versions/1/exports/onnx", headers=exports_api.acme
    )

    assert missing.status_code == 404
    assert "refused" in missing.json()["detail"]
    entry = exports_api.http.get(
        f"/v1/models/{name}/versions/1/exports", headers=exports_api.acme
    ).json()["exports"]["onnx"]
    assert entry["status"] == "refused"
    assert entry["max_abs_diff"] > 0.0
    assert "export.tolerance" in entry["reason"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/{name}/versions/1/exports",
        "/v1/models/{name}/versions/1/exports/onnx",
        "/v1/models/{name}/versions/1/exports/torch_export",
    ],
)
def test_another_project_gets_404_for_exports(exports_api: ExportsApi, path: str) -> None:
    url = path.format(name=exports_api.accepted.name)
    assert exports_api.http.get(url, headers=exports_api.globex).status_code == 404
    assert exports_api.http.get(url, headers=exports_api.acme).status_code == 200


def test_an_unknown_format_is_refused_by_name(exports_api: ExportsApi) -> None:
    response = exports_api.http.get(
        f"/v1/models/{exports_api.accepted.name}/versions/1/exports/tflite",
        headers=exports_api.acme,
    )
    assert response.status_code == 422
    assert "export_format" in response.text


def test_maskd_models_download_format_onnx(
    exports_api: ExportsApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = exports_api.accepted.name
    with ExitStack() as stack:
        server = start_api_thread(stack, exports_api.settings)
        connection = ["models", "--url", server, "--api-key", exports_api.acme_key]
        download = ["download", name, "@candidate", "--format", "onnx", "--dir", str(tmp_path)]
        code = main([*connection, *download, "-o", "json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["onnx"]) == tmp_path / f"{name}-v1.onnx"
    assert Path(printed["onnx"]).read_bytes() == (
        exports_api.accepted.result.runs[0].workdir.exported("onnx").read_bytes()
    )
    report = json.loads(Path(printed["report"]).read_text())
    assert report["exports"]["onnx"]["status"] == "accepted"
