"""A client generated from /openapi.json by a standard generator works, unmodified.

What CI does for every client a user might generate: start the API (a real uvicorn on
loopback, over PostgreSQL), fetch its OpenAPI document, run ``openapi-python-client`` on it,
import the generated package as it is and submit every shipped example spec through it, then
read, list and cancel the jobs, reading typed answers (errors included) all the way. A document
that names operations after paths, types a spec's filled-in fields as required (``KeyError:
'tokens'`` on the quickstart examples), a method given by name as an object only, or two
schemas with one title fails here. The jobs stay QUEUED: no worker is needed. Last, a body
not sent as JSON gets the documented 415 rather than a 422 that blames the spec.
"""

from __future__ import annotations

import importlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
from service_testkit import Api

from maskd_core.comparison import comparison_metrics, comparison_table, failure_record
from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job
from service.config import Settings
from service.db import make_engine, make_sessionmaker
from service.main import create_app
from service.store import JobStore
from tests.examples_testkit import example_document, example_names, stand_in_document

CLIENT_PACKAGE = "maskd_api_client"
GENERATOR_CONFIG = "post_hooks: []\n"
"""The generator's default post-hooks run ruff from PATH; the generated code is used as is."""
OPERATION_ID = re.compile(r"^[a-z]+([A-Z][a-z0-9]*)*$")
JOB_OPERATIONS = {"submitJob", "getJob", "listJobs", "cancelJob", "listEvents", "streamEvents"}
MODEL_OPERATIONS = {"listModels", "listVersions", "getVersion", "downloadWeights", "setAlias"}
PROBES = {"healthz", "readyz", "metrics"}
"""Unauthenticated: no 401 to document."""
SMALL_IMAGES = {"min_size": 128, "max_size": 128}
"""The detectors' resize for the submissions here. The COCO examples' 800x1333 makes the API's
dry run of their ResNet-101/50 pairs take half a minute each on two busy cores; the spec's
structure, which is what a client must carry, is the example's."""


@dataclass
class ServedApi:
    url: str
    key: str
    store: JobStore
    project_id: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def served_api(migrated_postgres_url: str, tmp_path: Path) -> Iterator[ServedApi]:
    """The API under uvicorn on a loopback port, in a thread of the test process."""
    engine = make_engine(migrated_postgres_url)
    store = JobStore(make_sessionmaker(engine))
    key = store.create_api_key("acme")
    project = store.create_project("acme")
    settings = Settings(
        database_url=migrated_postgres_url,
        broker_url="filesystem://",
        data_dir=tmp_path / "var",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield ServedApi(f"http://127.0.0.1:{port}", key, store, project.id)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.dispose()


def submission(name: str, tmp_path: Path) -> dict[str, Any]:
    """The shipped example ``name`` on stand-in data, with ``SMALL_IMAGES`` for detectors."""
    document = stand_in_document(example_document(name), tmp_path)
    for role in ("teacher", "student"):
        args = document.get(role, {}).get("args", {})  # a teacher job has no student
        if "min_size" in args:
            args.update(SMALL_IMAGES)
    return document


def generated_client(document: dict[str, Any], folder: Path) -> ModuleType:
    """The package ``openapi-python-client`` generates from ``document``, imported unmodified.

    The generator's warnings are failures: it leaves out what it cannot type (a response whose
    schema it cannot resolve, say) and says so only there.
    """
    folder.mkdir(parents=True)
    source = folder / "openapi.json"
    source.write_text(json.dumps(document))
    config = folder / "generator.yaml"
    config.write_text(GENERATOR_CONFIG)
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(source),
            "--output-path",
            str(folder / CLIENT_PACKAGE),
            "--meta",
            "none",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = generated.stdout + generated.stderr
    assert generated.returncode == 0, report
    assert "Warning" not in report and "WARNING" not in report, report
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return importlib.import_module(CLIENT_PACKAGE)


def job_operations() -> Any:
    """The generated ``api.jobs`` modules, one per operation (``submit_job`` for submitJob)."""
    names = ("submit_job", "get_job", "list_jobs", "cancel_job")
    modules = {name: importlib.import_module(f"{CLIENT_PACKAGE}.api.jobs.{name}") for name in names}
    return SimpleNamespace(**modules)


@pytest.fixture
def forget_generated_client() -> Iterator[None]:
    """Each test imports its own generation: nothing of an earlier one stays importable."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [name for name in sys.modules if name.split(".")[0] == CLIENT_PACKAGE]:
        del sys.modules[name]


@pytest.mark.slow
@pytest.mark.postgres
def test_the_document_names_operations_and_types_every_error(served_api: ServedApi) -> None:
    document = httpx.get(f"{served_api.url}/openapi.json").json()
    operations = {
        operation["operationId"]: (path, operation)
        for path, methods in document["paths"].items()
        for operation in methods.values()
    }
    assert set(operations) >= JOB_OPERATIONS | MODEL_OPERATIONS | PROBES
    assert all(OPERATION_ID.match(name) for name in operations), sorted(operations)
    for name, (path, operation) in operations.items():
        if path.startswith("/v1/"):
            assert "401" in operation["responses"], f"{name} does not document 401"
        for code, response in operation["responses"].items():
            if int(code) >= 400:
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                assert schema is not None, f"{name} documents {code} without a body schema"
            for link in response.get("links", {}).values():
                assert link["operationId"] in operations, f"{name}'s link {link} leads nowhere"


@pytest.mark.slow
@pytest.mark.postgres
def test_a_generated_client_submits_reads_lists_and_cancels_the_examples(
    served_api: ServedApi, tmp_path: Path, forget_generated_client: None
) -> None:
    document = httpx.get(f"{served_api.url}/openapi.json").json()
    client_package = generated_client(document, tmp_path / "generated")
    api = job_operations()
    models = importlib.import_module(f"{CLIENT_PACKAGE}.models")
    client = client_package.AuthenticatedClient(base_url=served_api.url, token=served_api.key)

    submitted: dict[str, Any] = {}
    for name in example_names():
        spec = models.JobSpec.from_dict(submission(name, tmp_path))
        answer = api.submit_job.sync_detailed(client=client, body=spec)
        assert answer.status_code == 201, (name, answer.content)
        job = answer.parsed
        assert isinstance(job, models.JobOut) and job.state == models.JobState.QUEUED
        assert isinstance(job.spec, models.JobSpecOut)
        # Filled in by the server from the task, typed in the answer.
        expected_tokens = 8 if job.spec.task == models.JobSpecOutTask.SEGMENTATION else 6
        assert job.spec.stage1.tokens == expected_tokens
        submitted[job.id] = job

    assert set(example_names()) == {f"{job.name}.yaml" for job in submitted.values()}
    for job_id, job in submitted.items():
        read = api.get_job.sync(job_id=job_id, client=client)
        assert isinstance(read, models.JobOut)
        assert (read.name, read.state, read.spec.to_dict()) == (
            job.name,
            models.JobState.QUEUED,
            job.spec.to_dict(),
        )
        assert isinstance(read.outputs, models.JobOutputs) and read.outputs.model is None

    page = api.list_jobs.sync(client=client, limit=100)
    assert isinstance(page, models.JobPage)
    assert {job.id for job in page.data} == set(submitted)

    for job_id in submitted:
        cancelled = api.cancel_job.sync(job_id=job_id, client=client)
        assert isinstance(cancelled, models.JobOut)
        assert cancelled.state == models.JobState.CANCELLED
    states = api.list_jobs.sync(client=client, state=[models.JobState.CANCELLED], limit=100)
    assert isinstance(states, models.JobPage) and len(states.data) == len(submitted)

    # Every error a client meets arrives typed, as its schema says.
    again = api.cancel_job.sync_detailed(job_id=next(iter(submitted)), client=client)
    assert again.status_code == 409 and isinstance(again.parsed, models.ErrorOut)
    missing = api.get_job.sync_detailed(job_id="no-such-job", client=client)
    assert missing.status_code == 404 and isinstance(missing.parsed, models.ErrorOut)
    assert "GET /v1/jobs" in missing.parsed.detail
    stranger = client_package.AuthenticatedClient(base_url=served_api.url, token="wrong")
    refused = api.list_jobs.sync_detailed(client=stranger)
    assert refused.status_code == 401 and isinstance(refused.parsed, models.ErrorOut)
    bad = models.JobSpec.from_dict(
        {**example_document("quickstart-segmentation.yaml"), "batch_size": 0}
    )
    invalid = api.submit_job.sync_detailed(client=client, body=bad)
    assert invalid.status_code == 422 and isinstance(invalid.parsed, models.ValidationErrorOut)
    assert invalid.parsed.detail[0].loc == ["body", "batch_size"]


@pytest.mark.slow
@pytest.mark.postgres
def test_a_generated_client_reads_outputs_typed_as_the_workers_write_them(
    served_api: ServedApi, tmp_path: Path, forget_generated_client: None
) -> None:
    """A comparison's outputs: the table from the core's own writer, and the links the
    publisher records (``workers/publishing.py``)."""
    document = stand_in_document(example_document("compare-methods-segmentation.yaml"), tmp_path)
    spec = JobSpec.model_validate(document)
    assert spec.comparison is not None
    job, _ = served_api.store.create_job(served_api.project_id, spec)
    summaries = [
        {
            "method": method.name,
            "seed": seed,
            "metrics": {"student_miou": 0.5 + 0.01 * seed},
            "seconds_per_step": {"stage2": 0.02},
        }
        for method in spec.comparison.methods
        for seed in spec.comparison.seeds
        if (method.name, seed) != ("mgd", 2)
    ]
    failed = failure_record("mgd", 2, "stage2/mgd/seed2", RuntimeError("the loss diverged"))
    table = comparison_table(
        spec, validate_job(spec), "miou", {"teacher_miou": 0.7}, summaries, [failed]
    )
    served_api.store.record_outputs(
        job.id,
        {
            "mlflow": {"run_id": "0123abcd", "experiment_id": "3"},
            "models": [
                {
                    "method": summary["method"],
                    "seed": summary["seed"],
                    "name": "acme.compare-methods-segmentation-student",
                    "version": str(number),
                    "uri": f"models:/acme.compare-methods-segmentation-student/{number}",
                }
                for number, summary in enumerate(summaries, start=1)
            ],
            "files": {"comparison": "/var/maskd/jobs/x/comparison.json"},
            "metrics": comparison_metrics(table),
            "comparison": table,
        },
    )
    client_package = generated_client(
        httpx.get(f"{served_api.url}/openapi.json").json(), tmp_path / "generated"
    )
    api = job_operations()
    models = importlib.import_module(f"{CLIENT_PACKAGE}.models")
    client = client_package.AuthenticatedClient(base_url=served_api.url, token=served_api.key)

    outputs = api.get_job.sync(job_id=job.id, client=client).outputs
    assert isinstance(outputs, models.JobOutputs)
    assert isinstance(outputs.mlflow, models.MlflowRunLink) and outputs.mlflow.run_id
    assert [(link.method, link.seed) for link in outputs.models][-1] == ("mgd", 1)
    assert outputs.models[0].uri.startswith("models:/")
    comparison = outputs.comparison
    assert isinstance(comparison, models.ComparisonOut) and comparison.failed_runs == 1
    rows = {row.method: row for row in comparison.methods}
    assert rows["mgd"].seeds == [0, 1] and rows["mgd"].failed[0].reason == "the loss diverged"
    assert rows["maskd"].mean == pytest.approx(0.51)
    assert outputs.metrics["maskd_miou_mean"] == pytest.approx(0.51)


def test_a_body_not_sent_as_json_gets_a_documented_415_saying_how_to_send_it(api: Api) -> None:
    """A YAML spec posted as it is (FastAPI would hand the raw bytes to the model, and the
    answer would blame the spec: "Input should be a valid dictionary")."""
    spec = (files("maskd_examples") / "quickstart-segmentation.yaml").read_bytes()
    for content_type in ("application/yaml", None):
        headers = api.headers()
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = api.http.post("/v1/jobs", content=spec, headers=headers)
        assert response.status_code == 415, response.text
        assert "`Content-Type: application/json`" in response.json()["detail"]
    assert api.store.list_jobs(api.project.id)[0] == []
    document = api.http.get("/openapi.json").json()
    for path, method in (("/v1/jobs", "post"), ("/v1/models/{name}/aliases/{alias}", "put")):
        body = document["paths"][path][method]["responses"]["415"]["content"]["application/json"]
        assert body["schema"]["$ref"].endswith("/ErrorOut")
