"""bench/make_folder_dataset.py, and bench/specs/segmentation-folder.yaml reading what it writes.

The generator writes a small set under the test's folder; the image_folder reader, the split the
runner uses and the job's dry run (``validate_job``) then read it as the benchmark does, with
the spec's roots moved there and the teacher's weights left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from bench.make_folder_dataset import class_names, make_folder_dataset
from maskd_core.data import build_dataset
from maskd_core.data.procedural import ProceduralShapes, ProceduralShapesArgs
from maskd_core.loader import train_val_split
from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job

SPEC = Path(__file__).resolve().parents[2] / "bench" / "specs" / "segmentation-folder.yaml"


def spec_on(root: Path) -> JobSpec:
    """The benchmark spec reading ``root`` instead of ``runs/shapes-folder``, without weights."""
    document: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    for key in ("dataset", "val_dataset"):
        document[key]["args"]["root"] = str(root)
    document["teacher"].pop("weights")
    return JobSpec.model_validate(document)


@pytest.fixture
def written(tmp_path: Path) -> Path:
    make_folder_dataset(tmp_path / "shapes", train=6, val=3, image_size=32)
    return tmp_path / "shapes"


def test_the_reader_finds_both_splits_at_their_sizes(written: Path) -> None:
    spec = spec_on(written)
    dataset = build_dataset(spec)
    train, val = train_val_split(spec, dataset)
    assert train is dataset and len(train) == 6, "every training image trains"
    assert len(val) == 3
    image, labels = val[0]
    assert image.shape == (3, 32, 32) and labels.shape == (32, 32)
    assert int(labels.min()) >= 0 and int(labels.max()) < 5
    with Image.open(written / "masks" / "val" / "000000.png") as mask:
        assert mask.mode == "P", "a palette mask, as Pascal VOC ships them"
    assert (written / "classes.txt").read_text().split() == class_names(5)


def test_training_images_are_the_procedural_samples_and_val_images_are_unseen(
    written: Path,
) -> None:
    spec = spec_on(written)
    train, val = train_val_split(spec, build_dataset(spec))
    generated = ProceduralShapes(ProceduralShapesArgs(image_size=32, data_seed=0), seed=0)
    for index in range(len(train)):
        assert torch.equal(train[index][1], generated[index][1])
        # 8-bit PNG rounding, after normalisation by the per-channel std (~0.22).
        assert torch.allclose(train[index][0], generated[index][0], atol=0.5 / 255 / 0.2)
    for val_index in range(len(val)):
        assert not any(torch.equal(val[val_index][0], train[i][0]) for i in range(len(train)))


def test_a_non_empty_folder_or_one_seed_for_both_splits_is_refused(
    written: Path, tmp_path: Path
) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        make_folder_dataset(written, train=2, val=2)
    with pytest.raises(ValueError, match="different data seeds"):
        make_folder_dataset(tmp_path / "other", train_seed=3, val_seed=3)


def test_the_benchmark_spec_validates_on_the_written_folder(written: Path) -> None:
    spec = spec_on(written)
    assert spec.comparison is not None
    assert [method.name for method in spec.comparison.methods] == ["maskd", "none", "fitnet", "mgd"]
    plan = validate_job(spec)
    assert [level.teacher_shape for level in plan.levels] == [(5, 4, 4)]
