"""Every argument that can name a file or folder is a policed path type.

The service checks what ``maskd_core.validate.input_paths`` reports, and that reports the
``LocalPath`` roots and ``SubPathOf`` sub-paths of the registered entries' argument models. A
plain ``str`` argument that names a file would slip past both, so this test walks every entry
of every registry and refuses any argument that can hold text unless it is one of those types
or is declared below as not a path, with the reason. A new dataset or model that takes a path
must type it; one that takes other text must say here why it is not a path.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from maskd_core.data import DATASETS
from maskd_core.methods import METHODS
from maskd_core.models import MODELS
from maskd_core.paths import InputPathMarker, LocalPath, SubPathOf, path_kind
from maskd_core.registry import Registry
from maskd_core.spec import DatasetSpec, JobSpec, ModelSpec, ValDatasetSpec
from maskd_core.tasks import TASKS
from maskd_core.validate import input_paths

NOT_PATHS: dict[tuple[str, str], str] = {
    ("VocArgs", "classes"): "class names, matched against <name> in the XML files",
    ("VocArgs", "class_map"): "class names to rename or drop, matched against <name>",
    ("ImageFolderArgs", "image_suffix"): "the end of an image's file name (no '/' allowed)",
    ("ImageFolderArgs", "mask_suffix"): "the end of a mask's file name (no '/' allowed)",
    ("ImageFolderArgs", "class_names"): "names of the mask values, for reports",
    ("ModelSpec", "arch"): "a name in the model registry",
    ("ModelSpec", "args"): "the architecture's arguments, walked through its registry entry",
    ("ModelSpec", "layers"): "module names inside the network",
    ("ModelSpec", "weights"): "a local file or a models:/ URI; input_paths reports the local "
    "ones as roots (test_input_paths_report_local_weights_as_roots)",
    ("DatasetSpec", "name"): "a name in the dataset registry",
    ("DatasetSpec", "args"): "the dataset's arguments, walked through its registry entry",
    ("ValDatasetSpec", "name"): "a name in the dataset registry",
    ("ValDatasetSpec", "args"): "the dataset's arguments, walked through its registry entry",
}
"""Arguments that hold text but never name a file or folder: (model class, field) → why."""

REGISTRIES: tuple[Registry[Any], ...] = (MODELS, DATASETS, METHODS, TASKS)


def may_hold_text(annotation: Any) -> bool:
    """Whether a field of this type can hold a string: ``str``, a path, ``Any``, or a
    container, union or annotation of one. ``Literal`` choices are fixed words, not paths."""
    if annotation in (str, Any, object) or (
        isinstance(annotation, type) and issubclass(annotation, PurePath | str)
    ):
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return False
    if origin is Annotated:
        return may_hold_text(get_args(annotation)[0])
    return any(may_hold_text(arg) for arg in get_args(annotation) if arg is not Ellipsis)


def argument_models() -> list[tuple[str, type[BaseModel]]]:
    models = {
        f"{registry.kind} {entry.name}": entry.args for registry in REGISTRIES for entry in registry
    }
    specs = [("spec", ModelSpec), ("spec", DatasetSpec), ("spec", ValDatasetSpec)]
    return [*sorted(models.items()), *specs]


def test_every_registry_has_entries() -> None:
    """The walk sees the real registries (an import that stopped registering would pass it)."""
    assert {"image_folder", "coco", "voc"} <= set(DATASETS.names())
    assert {"fcos", "seg_tiny_teacher"} <= set(MODELS.names())


def unpoliced_fields(model: type[BaseModel]) -> list[str]:
    """The fields of ``model`` that can hold text, are no path type and are not declared."""
    unpoliced = []
    for name, info in model.model_fields.items():
        kind = path_kind(info)
        if kind is None:
            if may_hold_text(info.annotation) and (model.__name__, name) not in NOT_PATHS:
                unpoliced.append(name)
            continue
        assert (model.__name__, name) not in NOT_PATHS, f"{name} is a path; drop it from NOT_PATHS"
        if isinstance(kind, SubPathOf):
            root = model.model_fields.get(kind.root)
            assert root is not None and isinstance(path_kind(root), InputPathMarker), (
                f"{model.__name__}: {name} is a sub-path of {kind.root!r}, which is not a "
                "LocalPath field of the same arguments"
            )
    return unpoliced


@pytest.mark.parametrize(("entry", "model"), argument_models(), ids=lambda v: str(v))
def test_every_text_argument_is_a_policed_path_or_declared_not_a_path(
    entry: str, model: type[BaseModel]
) -> None:
    unpoliced = unpoliced_fields(model)
    assert not unpoliced, (
        f"{entry} ({model.__name__}): {unpoliced} can hold text but are neither LocalPath nor "
        "SubPathOf; type the ones that name files or folders (maskd_core.paths), or add the "
        "others to NOT_PATHS with the reason"
    )


def test_the_walk_catches_a_plain_path_argument() -> None:
    """What a new dataset with an untyped path would look like, and a sub-path whose root is
    not a root."""

    class NewDatasetArgs(BaseModel):
        root: LocalPath
        images_dir: Annotated[str, SubPathOf("root")] = "images"
        labels_file: str = "labels.txt"
        extra: dict[str, Any] = {}
        crop: Path | None = None

    assert unpoliced_fields(NewDatasetArgs) == ["labels_file", "extra", "crop"]

    class OrphanSubPath(BaseModel):
        folder: str
        images_dir: Annotated[str, SubPathOf("folder")] = "images"

    with pytest.raises(AssertionError, match="not a LocalPath field"):
        unpoliced_fields(OrphanSubPath)


def test_not_paths_lists_only_fields_that_exist() -> None:
    """A stale entry would silently let a renamed field through."""
    fields = {
        (model.__name__, name) for _, model in argument_models() for name in model.model_fields
    }
    assert set(NOT_PATHS) <= fields


def test_may_hold_text_recognises_the_shapes_arguments_take() -> None:
    assert may_hold_text(str) and may_hold_text(Path) and may_hold_text(str | None)
    assert may_hold_text(list[str]) and may_hold_text(dict[str, int]) and may_hold_text(Any)
    assert may_hold_text(Annotated[str, "x"]) and may_hold_text(tuple[int, str])
    assert not may_hold_text(int) and not may_hold_text(Literal["a", "b"])
    assert not may_hold_text(tuple[float, float]) and not may_hold_text(int | None)


def test_input_paths_report_local_weights_as_roots(tmp_path: Path) -> None:
    """``ModelSpec.weights`` is declared above as policed by ``input_paths``: check it is."""
    spec = JobSpec.model_validate(
        {
            "task": "segmentation",
            "teacher": {
                "arch": "seg_tiny_teacher",
                "weights": str(tmp_path / "t.pt"),
                "layers": ["backbone"],
            },
            "student": {"arch": "seg_tiny_student", "weights": "s.pt", "layers": ["backbone"]},
        }
    )
    found = {item.field: item for item in input_paths(spec)}
    assert found["teacher.weights"].path == tmp_path / "t.pt"
    assert found["student.weights"].path == Path("s.pt").resolve()
    assert found["student.weights"].root is None
