"""Zero-config pairing through the API: a spec without layers is accepted, one whose default
taps cannot pair is a 422 naming student.layers, and a job's outputs show its pairing."""

from __future__ import annotations

from service_testkit import Api, spec_body

from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job

NO_LAYERS = {"teacher": {"arch": "seg_tiny_teacher"}, "student": {"arch": "seg_tiny_student"}}


def test_a_spec_without_layers_is_accepted_and_its_outputs_show_the_pairing(api: Api) -> None:
    body = spec_body(**NO_LAYERS)
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["spec"]["student"]["layers"] is None
    # What the worker records when it starts the job (workers.reporting): the plan's pairing.
    pairing = validate_job(JobSpec.model_validate(body)).pairing()
    api.store.record_outputs(job["id"], {"pairing": pairing})
    read = api.http.get(f"/v1/jobs/{job['id']}", headers=api.headers())
    assert read.status_code == 200, read.text
    shown = read.json()["outputs"]["pairing"]
    assert shown == pairing
    assert shown["layers_from"]["teacher"] == "registry defaults"
    assert [(lv["teacher_layer"], lv["student_layer"]) for lv in shown["levels"]] == [
        ("head", "head")
    ]


def test_default_taps_at_other_strides_are_422_naming_student_layers(api: Api) -> None:
    detector = {"backbone": "tiny", "min_size": 64, "max_size": 64, "fpn_channels": 32}
    body = spec_body(
        task="detection",
        dataset={"name": "procedural_boxes", "args": {"num_samples": 2, "image_size": 64}},
        teacher={"arch": "retinanet", "args": detector},
        student={"arch": "fasterrcnn", "args": detector},
    )
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "student", "layers"]
    assert "strides 8, 16, 32, 64, 128" in problem["msg"] and "name the layers" in problem["msg"]
