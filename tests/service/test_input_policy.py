"""Hostile specs against the input policy, through ``POST /v1/jobs`` on SQLite.

Each attack names files the submitting project may not read: a sub-path that is absolute or
climbs out with ``..``, a link in one project's inputs folder into another's, a root that is a
link into the data directory, a folder of many files. Each is a 422 that names the field and the
allowed folders, lists nothing it found, stores nothing, and comes back quickly. The same
folders without the trick are accepted, so the policy is not simply refusing everything.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from service_testkit import Api, open_api, spec_body

from maskd_core.data import scan
from maskd_core.errors import SpecError
from service.inputs import check_input_paths


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """These tests are about paths, not the database: SQLite only."""
    return sqlite_url


def write_dataset(root: Path, names: tuple[str, ...] = ("a", "b")) -> Path:
    """A valid ``image_folder`` dataset: 16×16 images with two-class masks."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 1
    for name in names:
        Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{name}.png")
    return root


def folder_spec(root: Path | str, **args: Any) -> dict[str, Any]:
    dataset = {"name": "image_folder", "args": {"root": str(root), "num_classes": 2, **args}}
    return spec_body(dataset=dataset)


def refused(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """The one problem of a 422 answered within seconds, after checking nothing was stored."""
    started = time.monotonic()
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    elapsed = time.monotonic() - started
    assert response.status_code == 422, response.text
    assert elapsed < 10, f"refusing took {elapsed:.1f} s"
    [problem] = response.json()["detail"]
    assert problem["type"] in ("spec_error", "value_error"), problem
    listed = api.http.get("/v1/jobs", headers=api.headers()).json()["data"]
    assert listed == [] and api.queued_messages() == []
    return dict(problem)


def inputs(api: Api, project: str) -> Path:
    return api.settings.project_inputs_dir(project)


def test_a_project_reads_its_own_inputs_folder(api: Api) -> None:
    """The control: the folder the attacks below start from is accepted as it is."""
    root = write_dataset(inputs(api, "acme") / "shapes")
    response = api.http.post("/v1/jobs", json=folder_spec(root), headers=api.headers())
    assert response.status_code == 201, response.text


def test_an_absolute_sub_path_is_refused(api: Api) -> None:
    root = write_dataset(inputs(api, "acme") / "shapes")
    theirs = write_dataset(inputs(api, "globex") / "private", ("secret",))
    for field in ("images_dir", "masks_dir"):
        problem = refused(api, folder_spec(root, **{field: str(theirs / "images")}))
        assert problem["loc"] == ["body", "dataset", "args"]
        assert f"{field}: Value error, must be a path relative to 'root'" in problem["msg"]
        assert "secret" not in problem["msg"]


def test_a_sub_path_climbing_out_with_dots_is_refused(api: Api) -> None:
    root = write_dataset(inputs(api, "acme") / "shapes")
    write_dataset(inputs(api, "globex") / "private", ("secret",))
    for value in ("../..", "../../globex/private/images", "images/../../../globex"):
        problem = refused(api, folder_spec(root, images_dir=value))
        assert "images_dir: Value error, must stay inside 'root'" in problem["msg"]
        assert "secret" not in problem["msg"]


def test_a_link_from_one_projects_inputs_into_anothers_is_refused(api: Api) -> None:
    """acme's dataset is real, but its images/ is a link into globex's inputs."""
    theirs = write_dataset(inputs(api, "globex") / "private", ("secret",))
    root = write_dataset(inputs(api, "acme") / "shapes")
    for name in ("a", "b"):
        (root / "images" / f"{name}.png").unlink()
    (root / "images").rmdir()
    (root / "images").symlink_to(theirs / "images")
    problem = refused(api, folder_spec(root))
    assert problem["loc"] == ["body", "dataset", "args", "images_dir"]
    assert "data directory" in problem["msg"]
    assert str(inputs(api, "acme").resolve()) in problem["msg"], "names the allowed folder"
    assert "globex" not in problem["msg"] and "secret" not in problem["msg"]

    # The same link as the root itself, and as a single file inside acme's images/.
    (inputs(api, "acme") / "borrowed").symlink_to(theirs)
    problem = refused(api, folder_spec(inputs(api, "acme") / "borrowed"))
    assert problem["loc"] == ["body", "dataset", "args", "root"]
    assert "globex" not in problem["msg"]
    (root / "images").unlink()
    write_dataset(root)
    (root / "images" / "c.png").symlink_to(theirs / "images" / "secret.png")
    (root / "masks" / "c.png").symlink_to(theirs / "masks" / "secret.png")
    problem = refused(api, folder_spec(root))
    assert problem["loc"] == ["body", "dataset", "args", "images_dir"]
    assert "'c.png' is a symbolic link that leads outside" in problem["msg"]
    assert "globex" not in problem["msg"] and "secret" not in problem["msg"]


def test_a_root_that_links_into_the_data_directory_is_refused(api: Api, tmp_path: Path) -> None:
    """A folder outside data_dir whose link leads to another job's files is refused as if the
    spec had named them."""
    other_job = write_dataset(api.settings.jobs_dir / "someone-elses-job" / "data")
    (tmp_path / "innocent").symlink_to(other_job)
    problem = refused(api, folder_spec(tmp_path / "innocent"))
    assert problem["loc"] == ["body", "dataset", "args", "root"]
    assert "data directory" in problem["msg"] and "someone-elses-job" not in problem["msg"]
    (tmp_path / "weights.pt").symlink_to(api.settings.jobs_dir / "someone-elses-job" / "s.pt")
    weights = {"arch": "seg_tiny_teacher", "layers": ["backbone"]}
    body = spec_body(teacher={**weights, "weights": str(tmp_path / "weights.pt")})
    problem = refused(api, body)
    assert problem["loc"] == ["body", "teacher", "weights"]


def test_sub_paths_are_checked_against_the_input_roots(api: Api, tmp_path: Path) -> None:
    """With MASKD_INPUT_ROOTS set, a root inside them may not link its subfolders out."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_dataset(outside, ("private",))
    root = write_dataset(allowed / "shapes")
    restricted = api.settings.model_copy(update={"input_roots": [allowed]})
    with open_api(restricted, api.store) as guarded:
        accepted = guarded.http.post("/v1/jobs", json=folder_spec(root), headers=guarded.headers())
        assert accepted.status_code == 201, accepted.text
        (root / "masks").rename(root / "old-masks")
        (root / "masks").symlink_to(outside / "masks")
        response = guarded.http.post("/v1/jobs", json=folder_spec(root), headers=guarded.headers())
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "dataset", "args", "masks_dir"]
    assert "MASKD_INPUT_ROOTS" in problem["msg"] and str(allowed.resolve()) in problem["msg"]
    assert "outside" not in problem["msg"].replace("leads (following symbolic links) outside", "")


@pytest.fixture
def in_process_api(api: Api) -> Iterator[Api]:
    """``api`` validating in its own process, where a test's patches of the core apply."""
    settings = api.settings.model_copy(update={"validation_processes": 0})
    with open_api(settings, api.store) as opened:
        yield opened


def test_a_folder_of_many_files_is_refused_quickly_without_listing_them(
    in_process_api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``root: /usr`` with ``images_dir: .`` walked a whole tree; now the walk is bounded by
    entries (lowered here so the test need not write a quarter of a million files)."""
    monkeypatch.setattr(scan, "MAX_FOLDER_ENTRIES", 200)
    root = tmp_path / "big"
    for part in range(5):
        (root / f"part{part}").mkdir(parents=True)
        for index in range(100):
            (root / f"part{part}" / f"file{index}.txt").write_bytes(b"")
    problem = refused(in_process_api, folder_spec(root, images_dir="."))
    assert problem["loc"] == ["body", "dataset", "args", "images_dir"]
    assert "more than 200 files and folders" in problem["msg"]
    assert "file" not in problem["msg"].replace("files", "") and "part" not in problem["msg"]


def test_listing_is_bounded_in_time_too(
    in_process_api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scan, "MAX_SCAN_SECONDS", 0.0)
    problem = refused(in_process_api, folder_spec(write_dataset(tmp_path / "slow")))
    assert "took longer than 0 s" in problem["msg"]


@pytest.mark.parametrize(
    "weights", ["bad\x00path.pt", "/" + "x" * 5000, "loop/x.pt"], ids=["nul", "long", "loop"]
)
def test_paths_no_file_system_call_can_take_are_422_not_500(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: str
) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    monkeypatch.chdir(tmp_path)
    body = spec_body(teacher={"arch": "seg_tiny_teacher", "layers": ["backbone"]})
    body["teacher"]["weights"] = weights
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 422, response.text
    folder = folder_spec("data\x00dir")
    response = api.http.post("/v1/jobs", json=folder, headers=api.headers())
    assert response.status_code == 422, response.text


def test_the_worker_check_sees_a_link_changed_after_submission(api: Api) -> None:
    """The worker runs ``check_input_paths`` again before the job reads anything
    (``workers.tracking``): a link swapped in after the API accepted the job is refused."""
    from maskd_core.spec import JobSpec

    theirs = write_dataset(inputs(api, "globex") / "private", ("secret",))
    root = write_dataset(inputs(api, "acme") / "shapes")
    spec = JobSpec.model_validate(folder_spec(root))
    check_input_paths(spec, "acme", api.settings)
    (root / "masks").rename(root / "old-masks")
    (root / "masks").symlink_to(theirs / "masks")
    with pytest.raises(SpecError) as caught:
        check_input_paths(spec, "acme", api.settings)
    assert caught.value.field == "dataset.args.masks_dir"


def test_the_val_dataset_is_policed_like_the_dataset(api: Api) -> None:
    """A validation dataset in another project's inputs is refused at its own field, before
    anything there is opened; the project's own validation folder is accepted."""
    root = write_dataset(inputs(api, "acme") / "shapes")
    theirs = write_dataset(inputs(api, "globex") / "private", ("secret",))
    body = folder_spec(root)
    body["val_dataset"] = {"args": {"root": str(theirs), "num_classes": 2}}
    problem = refused(api, body)
    assert problem["loc"] == ["body", "val_dataset", "args", "root"]
    assert "data directory" in problem["msg"] and "secret" not in problem["msg"]
    body["val_dataset"] = {"args": {"root": str(root), "num_classes": 2, "images_dir": "../x"}}
    assert "must stay inside 'root'" in refused(api, body)["msg"]
    own = write_dataset(inputs(api, "acme") / "shapes-val", ("c",))
    body["val_dataset"] = {"args": {"root": str(own), "num_classes": 2}}
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 201, response.text
