"""The pairing from submission on: the dry run that validates a spec plans its pairing anyway,
so the 201 answer and the stored job carry ``outputs.pairing`` before any worker has the job."""

from __future__ import annotations

from service_testkit import Api, spec_body

from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job

NO_LAYERS = {"teacher": {"arch": "seg_tiny_teacher"}, "student": {"arch": "seg_tiny_student"}}


def test_the_submission_answer_and_the_queued_job_carry_the_pairing(api: Api) -> None:
    body = spec_body(**NO_LAYERS)
    expected = validate_job(JobSpec.model_validate(body)).pairing()

    created = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["outputs"]["pairing"] == expected
    assert expected["layers_from"] == {
        "teacher": "registry defaults",
        "student": "registry defaults",
    }

    read = api.http.get(f"/v1/jobs/{job['id']}", headers=api.headers())
    assert read.status_code == 200, read.text
    assert read.json()["state"] == "QUEUED"
    assert read.json()["outputs"]["pairing"] == expected


def test_named_layers_show_as_the_spec_chose_them(api: Api) -> None:
    body = spec_body()  # layers ["backbone"] on both sides
    created = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert created.status_code == 201, created.text
    pairing = created.json()["outputs"]["pairing"]
    assert pairing["layers_from"] == {"teacher": "spec", "student": "spec"}
    assert [(lv["teacher_layer"], lv["student_layer"]) for lv in pairing["levels"]] == [
        ("backbone", "backbone")
    ]
    # A layer the spec named has no declared stride: only its size tells it.
    assert pairing["levels"][0]["teacher"]["stride"] is None


def test_a_teacher_job_pairs_nothing_and_carries_no_pairing(api: Api) -> None:
    body = spec_body(kind="teacher", teacher_training={"iterations": 2, "optimizer": {"lr": 0.01}})
    del body["student"]
    created = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert created.status_code == 201, created.text
    assert created.json()["outputs"].get("pairing") is None
