"""Every shipped example spec passes the validation a submission gets (a dry run).

The examples name files this machine does not have: COCO under ``/data/coco``, weights written
by ``maskd train-teacher`` or downloaded from torchvision. Each test writes tiny stand-ins for the
data files in the format the spec names under ``tmp_path`` (``tests.examples_testkit``), and
leaves the weight files out: what is checked is everything else,
from the dataset and validation dataset to the models, their layers and channels. The paper's
COCO specs must score on val2017, not on a random part of train2017.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maskd_core.spec import JobSpec
from maskd_core.validate import input_paths, validate_job
from tests.examples_testkit import stand_in_document

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPECS = sorted(EXAMPLES.glob("*.yaml"))


def test_the_examples_are_found() -> None:
    assert {path.name for path in SPECS} >= {
        "quickstart-segmentation.yaml",
        "fcos-r101-r50-coco.yaml",
        "retinanet-r101-r50-coco.yaml",
        "deeplabv3-r101-r18-cityscapes.yaml",
    }


def stand_in(path: Path, tmp_path: Path) -> JobSpec:
    document = stand_in_document(yaml.safe_load(path.read_text()), tmp_path)
    return JobSpec.model_validate(document)


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=lambda path: path.stem)
def test_every_example_validates(path: Path, tmp_path: Path) -> None:
    spec = stand_in(path, tmp_path)
    plan = validate_job(spec)
    assert plan.levels or spec.kind == "teacher"  # a teacher job distils nothing


@pytest.mark.parametrize("path", SPECS, ids=lambda path: path.stem)
def test_examples_on_data_with_a_validation_split_use_it(path: Path) -> None:
    spec = JobSpec.model_validate(yaml.safe_load(path.read_text()))
    if spec.dataset.name != "coco":
        return  # generated data, split at random by val_fraction
    assert spec.val_dataset is not None, f"{path.name} must score on the dataset's val split"
    assert spec.val_dataset.args["annotations"] == "/data/coco/annotations/instances_val2017.json"
    fields = {item.field for item in input_paths(spec)}
    assert {"val_dataset.args.annotations", "val_dataset.args.images"} <= fields


def test_the_cityscapes_example_follows_the_paper() -> None:
    """Trained on 512×1024 crops of the train split, scored on the whole val images, with the
    auxiliary heads distilled at 0.4 through the main logits' tokens."""
    path = EXAMPLES / "deeplabv3-r101-r18-cityscapes.yaml"
    spec = JobSpec.model_validate(yaml.safe_load(path.read_text()))
    assert spec.val_dataset is not None
    assert spec.dataset.args["images_dir"] == "leftImg8bit/train"
    assert spec.val_dataset.args["images_dir"] == "leftImg8bit/val"
    assert spec.dataset.args["crop_size"] == [512, 1024]
    assert "crop_size" not in spec.val_dataset.args
    assert (spec.stage1.tokens, spec.stage1.iterations, spec.stage2.iterations) == (8, 10000, 40000)
    assert spec.stage2.method.params["aux_weight"] == 0.4
    assert spec.batch_size == 16


@pytest.mark.slow
def test_the_cityscapes_example_plans_the_aux_heads(tmp_path: Path) -> None:
    plan = validate_job(stand_in(EXAMPLES / "deeplabv3-r101-r18-cityscapes.yaml", tmp_path))
    assert [lv.teacher_shape[0] for lv in plan.levels] == [19]
    assert plan.aux is not None and plan.aux.teacher_shape[0] == plan.aux.student_shape[0] == 19
