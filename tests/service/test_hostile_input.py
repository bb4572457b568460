"""Hostile tenants and absurd input: never a 500, and every refusal names the field.

Each class of input is sent where it can hurt: NUL characters (PostgreSQL text cannot hold
them), non-finite numbers, integers and times beyond what the databases and Python hold,
absurd sizes (the service's limits, ``service.limits``), oversized and deeply nested bodies,
and YAML that expands without bound. The API tests run on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service_testkit import Api, open_api, spec_body

from maskd_cli import main
from service.api.schemas import ErrorOut, ValidationErrorOut
from service.config import Settings
from service.store import JobStore

# About 140 cases on two databases: the sweep belongs to `make test`, not the fast lane.
pytestmark = pytest.mark.slow

JSON = {"content-type": "application/json"}


def post_raw(api: Api, text: str, **headers: str) -> Any:
    """POST a body exactly as written: JSON extensions such as ``Infinity`` included."""
    return api.http.post("/v1/jobs", content=text, headers={**api.headers(), **JSON, **headers})


def post(api: Api, body: dict[str, Any], **headers: str) -> Any:
    return post_raw(api, json.dumps(body), **headers)


def refused(response: Any, *loc: str | int, kind: str | None = None) -> str:
    """Assert a 422 naming ``loc`` (in the documented body shape); return its message."""
    assert response.status_code == 422, response.text
    body = ValidationErrorOut.model_validate(response.json())
    named = {tuple(problem.loc): problem for problem in body.detail}
    assert tuple(loc) in named, f"{loc} not named in {list(named)}"
    if kind is not None:
        assert named[tuple(loc)].type == kind, named[tuple(loc)]
    return named[tuple(loc)].msg


def no_jobs(api: Api) -> bool:
    return api.store.list_jobs(api.project.id)[0] == []


# ------------------------------------------------------------------------ NUL characters


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"name": "a\x00b"}, ("name",)),
        (
            {"teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone"], "weights": "/x\x00"}},
            ("teacher", "weights"),
        ),
        (
            {"student": {"arch": "seg_tiny_student", "layers": ["back\x00bone"]}},
            ("student", "layers", 0),
        ),
        ({"dataset": {"args": {"root\x00": "x"}}}, ("dataset", "args", "'root\\x00'")),
        (
            {
                "stage2": {
                    "iterations": 6,
                    "method": {"name": "mgd", "params": {"a": [{"b": "\x00"}]}},
                }
            },
            ("stage2", "method", "params", "a", 0, "b"),
        ),
    ],
    ids=["name", "weights", "layer", "args-key", "nested-params-value"],
)
def test_a_nul_in_the_spec_is_a_422_naming_the_field(
    api: Api, overrides: dict[str, Any], loc: tuple[str | int, ...]
) -> None:
    assert "NUL" in refused(post(api, spec_body(**overrides)), "body", *loc, kind="nul_character")
    assert no_jobs(api)


def test_a_nul_in_a_path_query_or_header_is_a_422_naming_it(api: Api) -> None:
    get = api.http.get
    refused(get("/v1/jobs/abc%00def", headers=api.headers()), "path", "job_id")
    refused(get("/v1/jobs/x%00/events", headers=api.headers()), "path", "job_id")
    refused(get("/v1/jobs", params={"name": "a\x00"}, headers=api.headers()), "query", "name")
    refused(get("/v1/jobs", params={"cursor": "\x00"}, headers=api.headers()), "query", "cursor")
    refused(get("/v1/models/acme.x%00/versions", headers=api.headers()), "path", "name")
    response = api.http.put(
        "/v1/models/acme.x/aliases/a%00", json={"version": "1"}, headers=api.headers()
    )
    refused(response, "path", "alias")
    response = post(api, spec_body(), **{"Idempotency-Key": "key\x00"})
    refused(response, "header", "idempotency-key")
    # A cursor is opaque, but one carrying a NUL in its job id is refused all the same.
    cursor = base64.urlsafe_b64encode(json.dumps(["2030-01-01T00:00:00+00:00", "a\x00"]).encode())
    response = get("/v1/jobs", params={"cursor": cursor.decode()}, headers=api.headers())
    refused(response, "query", "cursor")
    assert no_jobs(api)


def test_names_too_long_to_be_names_are_refused_without_an_echo(api: Api) -> None:
    body = spec_body(teacher={"arch": "x" * 500_000, "layers": ["y" * 500_000]})
    response = post(api, body)
    refused(response, "body", "teacher", "arch", kind="string_too_long")
    refused(response, "body", "teacher", "layers", 0, kind="string_too_long")
    assert len(response.content) < 2000


def test_unpaired_surrogates_are_refused_and_the_answer_still_encodes(api: Api) -> None:
    text = json.dumps(spec_body(dataset={"args": {"\ud800": 1}}))  # ensure_ascii: "\\ud800"
    refused(post_raw(api, text), "body", "dataset", "args", "'\\ud800'", kind="string_unicode")


# ------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        ('"lr": Infinity', ("stage1", "optimizer", "lr")),
        ('"lr": 1e999', ("stage1", "optimizer", "lr")),
        ('"lr": NaN', ("stage1", "optimizer", "lr")),
        ('"loss_weight": -1e999', ("stage2", "method", "params", "loss_weight")),
        ('"deep": [1, {"x": Infinity}]', ("stage2", "method", "params", "deep", 1, "x")),
    ],
)
def test_non_finite_numbers_are_refused_where_they_are(
    api: Api, text: str, loc: tuple[str | int, ...]
) -> None:
    body = json.dumps(
        spec_body(
            stage1={"iterations": 4, "optimizer": {"lr": "LR"}},
            stage2={"iterations": 6, "method": {"name": "maskd", "params": {"mask_eps": 1e-6}}},
        )
    )
    if loc[0] == "stage1":
        body = body.replace('"lr": "LR"', text)
    else:
        body = body.replace('"lr": "LR"', '"lr": 0.1').replace('"mask_eps": 1e-06', text)
    refused(post_raw(api, body), "body", *loc, kind="finite_number")
    assert no_jobs(api)


@pytest.mark.parametrize("task", [{}, [], 1, None])
def test_a_task_of_the_wrong_type_is_a_422(api: Api, task: Any) -> None:
    refused(post(api, spec_body(task=task)), "body", "task")


def test_integers_beyond_64_bits_are_refused_anywhere_in_the_spec(api: Api) -> None:
    refused(post(api, spec_body(seed=2**63)), "body", "seed")
    refused(post(api, spec_body(stage2={"iterations": 10**40})), "body", "stage2", "iterations")
    body = spec_body(comparison={"methods": ["maskd"], "seeds": [0, 2**64]})
    refused(post(api, body), "body", "comparison", "seeds", 1)
    body = spec_body(dataset={"args": {"num_samples": -(10**30)}})
    refused(post(api, body), "body", "dataset", "args", "num_samples", kind="int64_range")
    assert no_jobs(api)


def test_query_numbers_and_times_are_range_checked(api: Api) -> None:
    get, headers = api.http.get, api.headers()
    refused(get("/v1/jobs/x/events", params={"after": 2**63}, headers=headers), "query", "after")
    refused(
        get("/v1/jobs/x/events/stream", headers={**headers, "Last-Event-ID": str(10**30)}),
        "header",
        "last-event-id",
    )
    for name, moment in [
        ("created_after", "9999-12-31T23:59:59-23:00"),  # year 10000 in UTC
        ("created_before", "0001-01-01T00:00:00+05:00"),  # before year 1 in UTC
        ("created_after", "1e30"),  # a number is not an ISO 8601 time
    ]:
        refused(get("/v1/jobs", params={name: moment}, headers=headers), "query", name)
    far = json.dumps(["9999-12-31T23:59:59-23:59", "a"]).encode()
    cursor = base64.urlsafe_b64encode(far).decode()
    refused(get("/v1/jobs", params={"cursor": cursor}, headers=headers), "query", "cursor")
    deep = base64.urlsafe_b64encode(b"[" * 40_000).decode()  # beyond Python's recursion
    refused(get("/v1/jobs", params={"cursor": deep}, headers=headers), "query", "cursor")
    edge = get("/v1/jobs", params={"created_before": "9999-12-31T23:59:59"}, headers=headers)
    assert edge.status_code == 200, edge.text


def test_model_version_numbers_beyond_what_mlflow_holds_are_refused(api: Api) -> None:
    get, headers = api.http.get, api.headers()
    for version in ("99999999999999999999", "2147483648", "@", "1.5"):
        response = get(f"/v1/models/acme.x/versions/{version}", headers=headers)
        refused(response, "path", "version")
    response = api.http.put(
        "/v1/models/acme.x/aliases/champion", json={"version": "9" * 30}, headers=headers
    )
    refused(response, "body", "version")
    body = spec_body(
        teacher={
            "arch": "seg_tiny_teacher",
            "layers": ["backbone"],
            "weights": "models:/acme.x/99999999999999999999",
        }
    )
    refused(post(api, body), "body", "teacher", "weights")


# ------------------------------------------------------------------------ absurd sizes

DETECTION = {
    "task": "detection",
    "teacher": {"arch": "fcos", "args": {"backbone": "tiny"}, "layers": ["backbone"]},
    "student": {"arch": "fcos", "args": {"backbone": "tiny"}, "layers": ["backbone"]},
    "dataset": {"name": "procedural_boxes"},
}


@pytest.mark.parametrize(
    ("overrides", "loc", "setting"),
    [
        ({"stage1": {"iterations": 10**12}}, ("stage1", "iterations"), "MAX_ITERATIONS"),
        ({"stage2": {"iterations": 2 * 10**6}}, ("stage2", "iterations"), "MAX_ITERATIONS"),
        ({"batch_size": 10**9}, ("batch_size",), "MAX_BATCH_SIZE"),
        ({"num_workers": 10**5}, ("num_workers",), "MAX_NUM_WORKERS"),
        (
            {**DETECTION, "teacher": {**DETECTION["teacher"], "args": {"min_size": 10**6}}},
            ("teacher", "args", "min_size"),
            "MAX_IMAGE_SIZE",
        ),
        (
            {**DETECTION, "student": {**DETECTION["student"], "args": {"max_size": 10**5}}},
            ("student", "args", "max_size"),
            "MAX_IMAGE_SIZE",
        ),
        (
            {"dataset": {"name": "image_folder", "args": {"image_size": [10**6, 64]}}},
            ("dataset", "args", "image_size", 0),
            "MAX_IMAGE_SIZE",
        ),
        (
            {"comparison": {"methods": ["maskd", "none"], "seeds": list(range(100))}},
            ("comparison",),
            "MAX_COMPARISON_RUNS",
        ),
    ],
    ids=["iterations", "stage2-iterations", "batch", "workers", "min-size", "max-size",
         "image-size", "comparison"],
)  # fmt: skip
def test_absurd_sizes_are_refused_naming_the_field_and_the_setting(
    api: Api, overrides: dict[str, Any], loc: tuple[str | int, ...], setting: str
) -> None:
    started = time.perf_counter()
    message = refused(post(api, spec_body(**overrides)), "body", *loc, kind="limit_exceeded")
    assert f"MASKD_{setting}" in message
    assert time.perf_counter() - started < 5, "refused before any dry run"
    assert no_jobs(api)


def test_an_operator_can_raise_a_limit(service_settings: Settings, job_store: JobStore) -> None:
    body = spec_body(stage1={"iterations": 4}, stage2={"iterations": 2_000_000})
    settings = service_settings.model_copy(update={"max_iterations": 3_000_000})
    with open_api(settings, job_store) as raised:
        assert post(raised, body).status_code == 201


def test_unknown_names_are_blamed_on_the_name_not_the_args(api: Api) -> None:
    body = spec_body(teacher={"arch": "nope", "args": {"x": 1}, "layers": ["backbone"]})
    assert "unknown model" in refused(post(api, body), "body", "teacher", "arch")
    body = spec_body(dataset={"name": "nope", "args": {"x": 1}})
    assert "unknown dataset" in refused(post(api, body), "body", "dataset", "name")


# ------------------------------------------------------------------------ bodies


@pytest.fixture
def small_api(service_settings: Settings, job_store: JobStore) -> Iterator[Api]:
    settings = service_settings.model_copy(update={"max_request_bytes": 4096, "max_json_depth": 16})
    with open_api(settings, job_store) as opened:
        yield opened


def test_a_body_over_the_limit_is_a_413_read_or_streamed(small_api: Api) -> None:
    declared = post_raw(small_api, " " * 5000)
    assert declared.status_code == 413
    assert "MASKD_MAX_REQUEST_BYTES" in ErrorOut.model_validate(declared.json()).detail

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        for _ in range(100):
            yield b" " * 1000

    streamed = small_api.http.post(
        "/v1/jobs", content=chunks(), headers={**small_api.headers(), **JSON}
    )
    assert streamed.status_code == 413
    assert "MASKD_MAX_REQUEST_BYTES" in streamed.json()["detail"]
    assert post(small_api, spec_body()).status_code == 201  # a real spec fits


def test_json_nested_deeper_than_the_limit_is_a_422(small_api: Api) -> None:
    deep = post_raw(small_api, "[" * 1000 + "]" * 1000)
    assert "MASKD_MAX_JSON_DEPTH" in refused(deep, "body", kind="json_too_deep")
    nested: Any = 1
    for _ in range(20):
        nested = {"a": nested}
    spec = post(small_api, spec_body(dataset={"args": {"x": nested}}))
    refused(spec, "body", kind="json_too_deep")
    # Brackets inside strings are text, not nesting.
    assert post(small_api, spec_body(name="[" * 100)).status_code == 201


def test_a_422_lists_the_first_problems_and_counts_the_rest(api: Api) -> None:
    body = spec_body(teacher={"arch": "seg_tiny_teacher", "layers": list(range(50_000))})
    response = post(api, body)
    refused(response, "body", "teacher", "layers", 0)
    assert len(response.json()["detail"]) == 50
    assert "and 49950 more problems" in response.json()["message"]
    body = spec_body(dataset={"args": {f"k{i}": 0 for i in range(20_000)}})
    response = post(api, body)
    assert "and 19990 more" in refused(response, "body", "dataset", "args")
    assert len(response.content) < 5000


def test_the_openapi_document_shows_the_error_bodies_sent(api: Api) -> None:
    document = api.http.get("/openapi.json").json()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        if not path.startswith("/v1"):
            continue
        for method, operation in operations.items():
            responses = operation["responses"]
            for code, model in (("401", "ErrorOut"), ("413", "ErrorOut")):
                schema = responses[code]["content"]["application/json"]["schema"]
                assert schema["$ref"].endswith(f"/{model}"), (method, path, code)
            schema = responses["422"]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ValidationErrorOut"), (method, path)
    submit = document["paths"]["/v1/jobs"]["post"]["responses"]
    assert submit["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/QuotaErrorOut")
    assert "GetJob" in submit["201"]["links"]


# ------------------------------------------------------------------------ spec files


BILLION_LAUGHS = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


@pytest.mark.parametrize("command", ["jobs", "run"])
def test_a_yaml_bomb_is_refused_at_once(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    argv = (
        ["jobs", "--url", "http://127.0.0.1:9", "--api-key", "mk_x", "submit", str(bomb)]
        if command == "jobs"
        else ["run", str(bomb), "--workdir", str(tmp_path / "run")]
    )
    import maskd_core.runner  # noqa: F401 - `maskd run` imports torch first; not what is timed

    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < 1.0
    assert "anchors" in capsys.readouterr().err


def test_spec_files_without_aliases_still_load(tmp_path: Path) -> None:
    from maskd_cli.spec_files import SpecFileError, read_spec_file

    plain = tmp_path / "job.yaml"
    plain.write_text("name: ok\nstage1: {iterations: 4}\nlayers: [a, b]\n")
    assert read_spec_file(plain) == {
        "name": "ok",
        "stage1": {"iterations": 4},
        "layers": ["a", "b"],
    }
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(SpecFileError, match="too deeply"):
        read_spec_file(deep)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecFileError, match="UTF-8"):
        read_spec_file(binary)
