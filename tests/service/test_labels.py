"""Job labels: validated at submission, stored in ``job_labels`` (SQLite and PostgreSQL),
returned on reads, filtered by ``GET /v1/jobs?label=key=value`` (AND) and copied to MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError
from service_testkit import Api, make_spec, spec_body

from maskd_core.callbacks import Stage
from maskd_core.spec import MAX_LABELS, JobSpec
from workers.token_reuse import stage1_fingerprint
from workers.tracking import job_tracker


def listed(api: Api, *labels: str, key: str | None = None) -> list[str]:
    response = api.http.get(
        "/v1/jobs", params=[("label", label) for label in labels], headers=api.headers(key)
    )
    assert response.status_code == 200, response.text
    return [job["name"] for job in response.json()["data"]]


def test_label_filters_are_and_ed_and_scoped_to_the_project(api: Api) -> None:
    store, project = api.store, api.project
    store.create_job(project.id, make_spec("prod-vision", labels={"team": "vision", "env": "prod"}))
    store.create_job(project.id, make_spec("dev-vision", labels={"team": "vision", "env": "dev"}))
    store.create_job(project.id, make_spec("unlabelled"))
    globex = store.create_project("globex")
    store.create_job(globex.id, make_spec("their-vision", labels={"team": "vision"}))

    assert listed(api, "team=vision") == ["dev-vision", "prod-vision"]
    assert listed(api, "team=vision", "env=prod") == ["prod-vision"]
    assert listed(api, "env=prod", "team=vision") == ["prod-vision"]
    assert listed(api, "team=nlp") == []
    assert listed(api, "team=vision", "team=nlp") == [], "one key, two values: no job has both"
    assert listed(api, "env=dev", "missing=x") == []
    assert listed(api) == ["unlabelled", "dev-vision", "prod-vision"]
    assert listed(api, "team=vision", key=api.other_key) == ["their-vision"]

    page = api.http.get(
        "/v1/jobs", params={"label": "team=vision", "limit": 1}, headers=api.headers()
    ).json()
    assert [job["name"] for job in page["data"]] == ["dev-vision"]
    rest = api.http.get(
        "/v1/jobs",
        params={"label": "team=vision", "limit": 1, "cursor": page["next_cursor"]},
        headers=api.headers(),
    ).json()
    assert [job["name"] for job in rest["data"]] == ["prod-vision"]
    assert rest["next_cursor"] is None


def test_labels_come_back_on_reads(api: Api) -> None:
    job, _ = api.store.create_job(
        api.project.id, make_spec(labels={"team": "vision", "data.version": "v2.1"})
    )
    read = api.http.get(f"/v1/jobs/{job.id}", headers=api.headers()).json()
    assert read["spec"]["labels"] == {"team": "vision", "data.version": "v2.1"}
    [listed_job] = api.http.get("/v1/jobs", headers=api.headers()).json()["data"]
    assert listed_job["spec"]["labels"] == {"team": "vision", "data.version": "v2.1"}


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("team", "'team' is no label filter: write key=value"),
        ("=vision", "label key '' is not valid"),
        ("bad key=x", "label key 'bad key' is not valid"),
        ("team=", "label value '' is not valid"),
        ("team=a b", "label value 'a b' is not valid"),
        ("team=" + "x" * 129, "use 1 to 128 letters"),
    ],
)
def test_a_malformed_label_filter_is_a_422_naming_it(api: Api, label: str, message: str) -> None:
    response = api.http.get("/v1/jobs", params={"label": label}, headers=api.headers())
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["query", "label", 0]
    assert message in problem["msg"]


def test_submitted_labels_are_validated_with_messages_naming_them(api: Api) -> None:
    too_many = {f"k{index}": "v" for index in range(MAX_LABELS + 1)}
    for labels, where, message in (
        ({"team": "a b"}, ["body", "labels", "team"], "label value 'a b' is not valid"),
        ({"-team": "x"}, ["body", "labels", "-team", "[key]"], "label key '-team'"),
        ({"team": 3}, ["body", "labels", "team"], "valid string"),
        (too_many, ["body", "labels"], f"at most {MAX_LABELS} items"),
    ):
        response = api.http.post("/v1/jobs", json=spec_body(labels=labels), headers=api.headers())
        assert response.status_code == 422, response.text
        problems = response.json()["detail"]
        assert any(p["loc"] == where and message in p["msg"] for p in problems), problems
    assert api.store.list_jobs(api.project.id)[0] == []


def test_labels_leave_stage1_reuse_alone_and_must_be_a_mapping() -> None:
    """Labels describe a job; two jobs differing only in them reuse each other's tokens."""
    plain, labelled = make_spec(), make_spec(labels={"team": "vision"})
    assert stage1_fingerprint(plain) == stage1_fingerprint(labelled)
    assert plain.model_dump()["labels"] == {}
    with pytest.raises(ValidationError):
        JobSpec.model_validate(spec_body(labels=["team=vision"]))


def test_every_mlflow_run_of_a_job_carries_its_labels(tmp_path: Path) -> None:
    spec = make_spec(labels={"team": "vision", "data.version": "v2.1"})
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = job_tracker(
        tracking_uri,
        "acme",
        "job-1",
        spec,
        tmp_path / "artifacts",
        system_metrics_interval_seconds=None,
    )
    stage = Stage("stage1")
    tracker.on_stage_start(stage, 0, 4, spec)
    stage_run = tracker.stage_run(stage)
    tracker.finish()
    assert stage_run is not None
    client = MlflowClient(tracking_uri)
    for run_id in (tracker.run_id, stage_run):
        tags = client.get_run(run_id).data.tags
        assert tags["maskd.label.team"] == "vision", run_id
        assert tags["maskd.label.data.version"] == "v2.1", run_id
