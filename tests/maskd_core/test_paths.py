"""The path types (``maskd_core.paths``) and the bounded folder listing (``data.scan``).

Roots and sub-paths are refused at parse time when no file system call should see them, then
resolved with their symbolic links: a sub-path must stay under its resolved root, whatever
links it goes through, and a path the data itself names (COCO ``file_name``, VOC ids) must stay
in its folder. Errors repeat what the spec or the data said, never where a link leads.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest
from PIL import Image
from pydantic import BaseModel, ValidationError

from maskd_core.data import DATASETS, DenseDataset, scan
from maskd_core.data.scan import ScanDeadline, list_files
from maskd_core.errors import DataError, SpecError
from maskd_core.paths import (
    LocalPath,
    SubPathOf,
    args_input_paths,
    file_under,
    resolve_path,
    sub_path,
)
from maskd_core.spec import JobSpec
from maskd_core.validate import validate_job


class FolderArgs(BaseModel):
    root: LocalPath
    images_dir: Annotated[str, SubPathOf("root")] = "images"
    split: Annotated[str, SubPathOf("root", "splits/{}.txt")] | None = None
    weights: LocalPath | None = None


def parse(**args: object) -> FolderArgs:
    return FolderArgs.model_validate(args)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/etc", "not an absolute path"),
        ("../..", "'..' is not allowed"),
        ("images/../../other", "'..' is not allowed"),
        ("", "must not be empty"),
        ("ima\x00ges", "NUL"),
        ("x" * 300, "at most 255 bytes"),
    ],
)
def test_a_sub_path_must_be_relative_and_stay_below_its_root(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse(root="/data", images_dir=value)


def test_the_template_of_a_sub_path_is_checked_whole() -> None:
    with pytest.raises(ValidationError, match=re.escape("'..' is not allowed")):
        parse(root="/data", split="../../../etc/passwd")
    assert parse(root="/data", split="val/2012").split == "val/2012"


def test_plain_relative_sub_paths_parse() -> None:
    for value in ("images", "train/images", ".", "a..b"):
        assert parse(root="/data", images_dir=value).images_dir == value


@pytest.mark.parametrize("value", ["", "a\x00b", "/" + "x" * 300])
def test_a_root_refuses_what_no_file_system_call_should_see(value: str) -> None:
    with pytest.raises(ValidationError):
        parse(root=value)


def test_input_paths_resolve_roots_then_sub_paths(tmp_path: Path) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    found = args_input_paths(
        parse(root=str(tmp_path / "alias"), weights="w.pt", split="val"), "dataset.args"
    )
    fields = [item.field for item in found]
    assert fields == [
        "dataset.args.root",
        "dataset.args.weights",
        "dataset.args.images_dir",
        "dataset.args.split",
    ]
    root, weights, images, split = found
    assert root.path == tmp_path / "data" and root.given == str(tmp_path / "alias")
    assert weights.path == Path("w.pt").resolve()
    assert images.path == tmp_path / "data" / "images" and images.root is root
    assert split.path == tmp_path / "data" / "splits" / "val.txt"
    assert not any(item.escapes_root for item in found)


def test_a_sub_path_through_a_link_out_of_its_root_escapes(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "theirs" / "images").mkdir(parents=True)
    (tmp_path / "mine" / "images").symlink_to(tmp_path / "theirs" / "images")
    args = parse(root=str(tmp_path / "mine"))
    [_, images] = args_input_paths(args, "dataset.args")
    assert images.escapes_root and images.path == tmp_path / "theirs" / "images"
    with pytest.raises(SpecError) as caught:
        sub_path(args, "images_dir")
    assert caught.value.field == "dataset.args.images_dir"
    assert "leads outside dataset.args.root" in str(caught.value)
    assert "theirs" not in str(caught.value), "the link's target is not revealed"


def test_a_loop_of_links_is_a_spec_error_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(SpecError, match="cannot be resolved") as caught:
        resolve_path(tmp_path / "a" / "x", "dataset.args.root", given="a/x")
    assert caught.value.field == "dataset.args.root"


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.jpg", "a/../../b.jpg", ""])
def test_a_file_the_data_names_must_be_relative_and_inside(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="relative paths inside"):
        file_under(tmp_path, name, "x.json: image 3")


def test_a_file_the_data_names_may_not_link_out(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (tmp_path / "in" / "ok.jpg").write_bytes(b"x")
    (tmp_path / "in" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (tmp_path / "in" / "near.jpg").symlink_to(tmp_path / "in" / "ok.jpg")
    folder = tmp_path / "in"
    assert file_under(folder, "ok.jpg", "x") == folder / "ok.jpg"
    assert file_under(folder, "near.jpg", "x") == folder / "ok.jpg"
    with pytest.raises(DataError, match="leads outside") as caught:
        file_under(folder, "link.jpg", "x")
    assert "secret" not in str(caught.value)


# ------------------------------------------------------------------------ bounded listing


def listing(folder: Path, within: Path | None = None, **kwargs: object) -> list[Path]:
    return list_files(
        folder,
        suffixes=frozenset({".jpg"}),
        within=within or folder,
        field="dataset.args.images_dir",
        deadline=ScanDeadline(),
        **kwargs,  # type: ignore[arg-type]
    )


def test_listing_recurses_without_following_linked_folders(tmp_path: Path) -> None:
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name in ("root/a.jpg", "root/sub/b.JPG", "root/c.txt", "elsewhere/d.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "root" / "alias.jpg").symlink_to(tmp_path / "root" / "a.jpg")
    root = tmp_path / "root"
    assert listing(root) == [root / "a.jpg", root / "alias.jpg", root / "sub" / "b.JPG"]
    assert listing(root, recursive=False) == [root / "a.jpg", root / "alias.jpg"]


def test_listing_refuses_a_linked_file_outside_the_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (tmp_path / "root" / "a.jpg").symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(SpecError, match=re.escape("'a.jpg' is a symbolic link")) as caught:
        listing(tmp_path / "root")
    assert "secret" not in str(caught.value)


def test_listing_stops_at_the_entry_limit_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scan, "MAX_FOLDER_ENTRIES", 20)
    for index in range(30):
        (tmp_path / f"{index:03d}.txt").write_bytes(b"")
    with pytest.raises(SpecError, match="more than 20 files and folders") as caught:
        listing(tmp_path)
    assert caught.value.field == "dataset.args.images_dir"
    assert "000.txt" not in str(caught.value), "no listing of the folder"


def test_listing_stops_at_the_deadline(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(SpecError, match="took longer than 0 s"):
        list_files(
            tmp_path,
            suffixes=frozenset({".jpg"}),
            within=tmp_path,
            field="dataset.args.root",
            deadline=ScanDeadline(0.0),
        )


# ------------------------------------------------------------------------ the datasets


def build(name: str, **args: object) -> DenseDataset:
    return DATASETS.get(name)(DATASETS.parse_args(name, args), 0)


def write_pair(root: Path, name: str) -> None:
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "images" / f"{name}.jpg")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(root / "masks" / f"{name}.png")


def test_image_folder_refuses_sub_paths_out_of_its_root(tmp_path: Path) -> None:
    write_pair(tmp_path / "theirs", "secret")
    mine = tmp_path / "mine"
    write_pair(mine, "a")
    with pytest.raises(SpecError, match="relative to 'root'"):
        build("image_folder", root=str(mine), num_classes=2, images_dir=str(tmp_path / "theirs"))
    with pytest.raises(SpecError, match=re.escape("'..' is not allowed")):
        build("image_folder", root=str(mine), num_classes=2, images_dir="../theirs/images")
    (mine / "masks").rename(mine / "old-masks")
    (mine / "masks").symlink_to(tmp_path / "theirs" / "masks")
    with pytest.raises(SpecError, match="leads outside") as caught:
        build("image_folder", root=str(mine), num_classes=2)
    assert caught.value.field == "dataset.args.masks_dir" and "secret" not in str(caught.value)


def test_image_folder_checks_a_file_again_when_it_is_read(tmp_path: Path) -> None:
    """A link swapped in after the listing still cannot lead out of the root."""
    write_pair(tmp_path / "theirs", "a")
    mine = tmp_path / "mine"
    write_pair(mine, "a")
    dataset = build("image_folder", root=str(mine), num_classes=2)
    (mine / "images" / "a.jpg").unlink()
    (mine / "images" / "a.jpg").symlink_to(tmp_path / "theirs" / "images" / "a.jpg")
    with pytest.raises(DataError, match="leads outside"):
        dataset[0]


def test_coco_file_names_stay_in_the_image_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    annotations = tmp_path / "instances.json"
    entry = {"id": 1, "file_name": "../../etc/passwd", "width": 8, "height": 8}
    document = {"images": [entry], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    annotations.write_text(json.dumps(document))
    with pytest.raises(
        DataError, match=re.escape("instances.json: image id 1 names '../../etc/passwd'")
    ):
        build("coco", annotations=str(annotations), images=str(tmp_path / "images"))


def test_voc_split_ids_and_file_names_stay_in_their_folders(tmp_path: Path) -> None:
    root = tmp_path / "VOC"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("../../../outside\n")
    (tmp_path / "outside.xml").write_text("<annotation/>")
    with pytest.raises(DataError, match=re.escape("names '../../../outside.xml'")):
        build("voc", root=str(root))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    (root / "Annotations" / "000001.xml").write_text(
        "<annotation><filename>/etc/passwd</filename></annotation>"
    )
    with pytest.raises(DataError, match=re.escape("000001.xml: <filename> names '/etc/passwd'")):
        build("voc", root=str(root))
    with pytest.raises(SpecError, match=re.escape("'..' is not allowed")):
        build("voc", root=str(root), split="../../../../etc/x")
    with pytest.raises(SpecError, match="not an absolute path"):
        build("voc", root=str(root), images_dir="/srv/other")


def test_an_unreadable_first_sample_is_a_spec_error_when_submitted(tmp_path: Path) -> None:
    """``validate_job`` without a dataset is the API's; a DataError there would be a 500."""
    root = tmp_path / "data"
    write_pair(root, "a")
    write_pair(root, "b")
    (root / "images" / "a.jpg").write_bytes(b"not an image")
    spec = JobSpec.model_validate(
        {
            "task": "segmentation",
            "teacher": {"arch": "seg_tiny_teacher", "layers": ["backbone"]},
            "student": {"arch": "seg_tiny_student", "layers": ["backbone"]},
            "dataset": {"name": "image_folder", "args": {"root": str(root), "num_classes": 2}},
        }
    )
    started = time.monotonic()
    with pytest.raises(SpecError, match="cannot read image") as caught:
        validate_job(spec)
    assert caught.value.field == "dataset.args" and time.monotonic() - started < 60
