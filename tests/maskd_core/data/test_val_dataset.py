"""A job's own validation dataset (``val_dataset``) instead of the random ``val_fraction`` split.

Image folders with ``train/`` and ``val/`` sub-folders, written by the tests: the spec field, the
split the runner uses, what validation refuses and where it points, the input paths the service
polices, and a whole (tiny) job scoring the validation folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from maskd_core import runner
from maskd_core.data import build_dataset
from maskd_core.errors import SpecError
from maskd_core.loader import DatasetSubset, train_val_split
from maskd_core.spec import JobSpec
from maskd_core.validate import input_paths, validate_job


def write_split(root: Path, split: str, count: int, value: int) -> None:
    """``count`` 16×16 image/mask pairs under ``images/<split>`` and ``masks/<split>``; every
    mask holds class ``value`` in its centre, so the two splits are told apart by their masks."""
    for folder in ("images", "masks"):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = value
    rng = np.random.default_rng(value)
    for index in range(count):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / split / f"{split}{index}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / split / f"{split}{index}.png")


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    write_split(tmp_path, "train", 6, 1)
    write_split(tmp_path, "val", 2, 2)
    return tmp_path


def folder_args(root: Path, split: str, **extra: Any) -> dict[str, Any]:
    return {
        "root": str(root),
        "num_classes": 3,
        "images_dir": f"images/{split}",
        "masks_dir": f"masks/{split}",
        **extra,
    }


def job(root: Path, val: dict[str, Any] | None = None, **fields: Any) -> JobSpec:
    body: dict[str, Any] = {
        "task": "segmentation",
        "device": "cpu",
        "batch_size": 2,
        "teacher": {"arch": "seg_tiny_teacher", "args": {"base_channels": 8}, "layers": ["head"]},
        "student": {"arch": "seg_tiny_student", "args": {"base_channels": 4}, "layers": ["head"]},
        "dataset": {"name": "image_folder", "args": folder_args(root, "train")},
        "stage1": {"iterations": 2},
        "stage2": {"iterations": 2},
        **fields,
    }
    if val is not None:
        body["val_dataset"] = val
    return JobSpec.model_validate(body)


# --- the spec ---------------------------------------------------------------------------------


def test_val_dataset_defaults_to_the_datasets_name_and_is_optional(folders: Path) -> None:
    spec = job(folders, {"args": folder_args(folders, "val")})
    assert spec.val_dataset is not None and spec.val_dataset.name == "image_folder"
    assert job(folders).val_dataset is None
    stored = JobSpec.model_validate(spec.model_dump(mode="json"))
    assert stored == spec, "a stored spec reads back the same"
    described = JobSpec.model_json_schema()["properties"]
    assert "val_fraction" in str(described["val_dataset"])
    fraction = JobSpec.model_json_schema()["$defs"]["DatasetSpec"]["properties"]["val_fraction"]
    assert "without val_dataset" in fraction["description"].replace("Used only ", "")


@pytest.mark.parametrize("field", ["val_fraction", "augment"])
def test_split_settings_on_the_val_dataset_are_refused_saying_where_they_go(
    folders: Path, field: str
) -> None:
    value: Any = 0.5 if field == "val_fraction" else False
    with pytest.raises(ValidationError, match=f"{field} belong to dataset, not val_dataset"):
        job(folders, {"args": folder_args(folders, "val"), field: value})


# --- the split --------------------------------------------------------------------------------


def test_the_val_dataset_replaces_the_random_split(folders: Path) -> None:
    spec = job(folders, {"args": folder_args(folders, "val")})
    dataset = build_dataset(spec)
    train, val = train_val_split(spec, dataset)
    assert train is dataset and len(train) == 6, "every training sample trains"
    assert len(val) == 2 and {int(val[i][1].max()) for i in range(2)} == {2}
    fallback_train, fallback_val = train_val_split(job(folders), dataset)
    assert isinstance(fallback_val, DatasetSubset) and len(fallback_val) == 1
    assert len(fallback_train) == 5


def test_a_generated_val_dataset_does_not_repeat_the_training_samples() -> None:
    body = {
        "teacher": {"arch": "seg_tiny_teacher", "layers": ["head"]},
        "student": {"arch": "seg_tiny_student", "layers": ["head"]},
        "dataset": {"args": {"num_samples": 4, "image_size": 32}},
        "val_dataset": {"args": {"num_samples": 4, "image_size": 32}},
    }
    spec = JobSpec.model_validate(body)
    assert spec.val_dataset is not None and spec.val_dataset.name == "procedural_shapes"
    train, val = train_val_split(spec, build_dataset(spec))
    assert not torch.equal(train[0][0], val[0][0])


def test_a_dataset_of_one_sample_trains_when_the_validation_data_is_separate(
    tmp_path: Path,
) -> None:
    write_split(tmp_path, "train", 1, 1)
    write_split(tmp_path, "val", 1, 2)
    with pytest.raises(SpecError, match="at least 2 are needed to split"):
        build_dataset(job(tmp_path))
    spec = job(tmp_path, {"args": folder_args(tmp_path, "val")})
    assert len(train_val_split(spec, build_dataset(spec))[0]) == 1


# --- what validation refuses ------------------------------------------------------------------


def refusal(spec: JobSpec) -> SpecError:
    with pytest.raises(SpecError) as refused:
        validate_job(spec)
    return refused.value


def test_a_val_dataset_of_another_task_is_refused_at_its_name(folders: Path) -> None:
    error = refusal(job(folders, {"name": "procedural_boxes", "args": {"num_samples": 2}}))
    assert error.field == "val_dataset.name"
    assert "holds detection data but the job's task is 'segmentation'" in str(error)


def test_a_val_dataset_with_other_classes_is_refused_saying_how_to_fix_it(folders: Path) -> None:
    error = refusal(job(folders, {"args": folder_args(folders, "val", num_classes=4)}))
    assert error.field == "val_dataset.args"
    assert "val_dataset has 4 classes but dataset has 3" in str(error)
    assert "give val_dataset the same classes" in str(error)
    names = ["background", "tree", "road"]
    renamed = ["background", "tree", "path"]
    error = refusal(
        job(
            folders,
            {"args": folder_args(folders, "val", class_names=renamed)},
            dataset={
                "name": "image_folder",
                "args": folder_args(folders, "train", class_names=names),
            },
        )
    )
    assert error.field == "val_dataset.args"
    assert "class 2 is 'path' in val_dataset and 'road' in dataset" in str(error)


def test_a_val_dataset_that_cannot_be_read_is_refused_at_its_own_fields(folders: Path) -> None:
    error = refusal(job(folders, {"args": folder_args(folders / "nowhere", "val")}))
    assert error.field == "val_dataset.args.root"
    error = refusal(job(folders, {"args": folder_args(folders, "val", images_dir="images/test")}))
    assert error.field == "val_dataset.args.root" and "images/test" in str(error)
    error = refusal(job(folders, {"args": {**folder_args(folders, "val"), "extra": 1}}))
    assert error.field == "val_dataset.args" and "Allowed arguments" in str(error)
    (folders / "images" / "val" / "val0.png").write_bytes(b"not a png")
    error = refusal(job(folders, {"args": folder_args(folders, "val")}))
    assert error.field == "val_dataset.args" and "val0.png" in str(error)


def test_a_val_folder_without_images_is_refused_at_its_root(folders: Path) -> None:
    error = refusal(job(folders, {"name": "image_folder", "args": folder_args(folders, "none")}))
    assert error.field == "val_dataset.args.root" and "no images" in str(error)


# --- input paths ------------------------------------------------------------------------------


def test_the_val_datasets_paths_are_reported_for_the_input_policy(folders: Path) -> None:
    spec = job(folders, {"args": folder_args(folders / "elsewhere", "val")})
    found = {item.field: item for item in input_paths(spec)}
    assert found["val_dataset.args.root"].path == folders / "elsewhere"
    assert found["val_dataset.args.root"].root is None, "a root, checked before sub-paths"
    images = found["val_dataset.args.images_dir"]
    assert images.root is found["val_dataset.args.root"]
    assert images.path == folders / "elsewhere" / "images" / "val"
    roots = [item.field for item in input_paths(spec) if item.root is None]
    assert roots[-1] == "val_dataset.args.root" and "dataset.args.root" in roots


# --- a whole job ------------------------------------------------------------------------------


def test_a_job_scores_its_val_dataset(folders: Path, tmp_path: Path) -> None:
    """The teacher, the masked teacher and the student are all scored on the 2 validation
    images (class 2 in the centre), never on training images (class 1)."""
    seen: list[int] = []
    original = runner.val_batches

    def counting(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(dataset))
        assert {int(dataset[i][1].max()) for i in range(len(dataset))} == {2}
        return original(dataset, *args, **kwargs)

    spec = job(folders, {"args": folder_args(folders, "val")}, checkpoint_every=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "val_batches", counting)
        result = runner.run_job(spec, tmp_path / "work")
    assert seen and set(seen) == {2}
    summary = json.loads(result.runs[0].workdir.summary.read_text())
    assert "student_miou" in summary["metrics"]
