"""Arguments that name local files and folders, typed so that every one of them can be policed.

Each argument of a registered model or dataset that names a file or folder has one of two types:

- ``LocalPath``, a **root**: absolute, or relative to the process's working directory. The
  service checks it against its input policy (``service.inputs``) before anything opens it.
- ``Annotated[str, SubPathOf("root")]``, a **sub-path** of the root field ``root`` of the same
  argument model (``images_dir`` under ``root``). An absolute value, or one with a ``..``
  component, is refused when the arguments are parsed. When the spec is checked,
  ``<root>/<value>`` is resolved with its symbolic links and must stay under the resolved root.

The core only types and resolves paths (``args_input_paths``, ``sub_path``, ``file_under``);
which roots a job may read is the service's policy. ``tests/maskd_core/test_path_fields.py``
walks every registry entry and fails on a string argument that is neither type (nor declared
not to be a path), so a new dataset or model cannot reopen the hole. This module imports no
torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated, Any, get_args, get_origin

from pydantic import AfterValidator, BaseModel, GetCoreSchemaHandler
from pydantic.fields import FieldInfo
from pydantic_core import CoreSchema, core_schema

from maskd_core.errors import DataError, SpecError

MAX_PATH_CHARS = 4096
"""The longest path argument accepted (Linux's PATH_MAX)."""
MAX_NAME_BYTES = 255
"""The longest single file or folder name accepted (NAME_MAX)."""


def _plain_path(value: str) -> str:
    """Refuse what no file system call should ever see: empty, NUL, over-long names."""
    if not value:
        raise ValueError("a path must not be empty")
    if "\x00" in value:
        raise ValueError("a path must not contain a NUL character")
    if len(value) > MAX_PATH_CHARS:
        raise ValueError(f"a path must be at most {MAX_PATH_CHARS} characters")
    if any(
        len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in value.split("/")
    ):
        raise ValueError(f"a file or folder name must be at most {MAX_NAME_BYTES} bytes")
    return value


def check_plain_path(value: str, field: str) -> None:
    """``LocalPath``'s parse-time check for a path field typed elsewhere (a model's
    ``weights``), as a ``SpecError`` naming ``field``."""
    try:
        _plain_path(value)
    except ValueError as exc:
        raise SpecError(f"{field}: {exc}", field=field) from None


class InputPathMarker:
    """Marks a root argument: a file or folder the job reads, checked against the input policy.

    Which folders a job may read is the service's policy, so that one tenant cannot point a
    job at another's files; the core only reports and resolves such paths.
    """

    def __repr__(self) -> str:
        return "InputPathMarker()"


LocalPath = Annotated[str, InputPathMarker(), AfterValidator(_plain_path)]
"""A root argument: a local file or folder the job reads (weights, dataset roots)."""


@dataclass(frozen=True)
class SubPathOf:
    """Marks a sub-path argument: relative to the ``LocalPath`` field ``root`` of the same model.

    ``template`` places the value under the root: ``"{}"`` (the value is the relative path) or,
    say, ``"ImageSets/Main/{}.txt"`` for an argument that names a file there. Parsing refuses a
    value whose relative path is absolute or has a ``..`` component.
    """

    root: str
    template: str = "{}"

    def relative(self, value: str) -> str:
        """The path under the root that ``value`` names."""
        return self.template.format(value)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def _check(self, value: str) -> str:
        _plain_path(value)
        relative = PurePath(self.relative(value))
        if relative.is_absolute():
            raise ValueError(
                f"must be a path relative to {self.root!r}, not an absolute path; move the "
                f"folder under {self.root!r} or set {self.root!r} to a folder above it"
            )
        if ".." in relative.parts:
            raise ValueError(
                f"must stay inside {self.root!r}: '..' is not allowed; set {self.root!r} to a "
                "folder that holds everything the dataset reads"
            )
        return value


PathKind = InputPathMarker | SubPathOf


def path_kind(info: FieldInfo) -> PathKind | None:
    """The path type of a field (``LocalPath``, a ``SubPathOf`` sub-path), also inside ``|
    None``; ``None`` for a field that is neither."""
    return _kind(info.annotation, info.metadata)


def _kind(annotation: Any, metadata: Any = ()) -> PathKind | None:
    for item in metadata:
        if isinstance(item, InputPathMarker | SubPathOf):
            return item
    if get_origin(annotation) is Annotated:
        return _kind(None, get_args(annotation)[1:])
    for arg in get_args(annotation):
        found = _kind(arg)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class InputPath:
    """One local path a spec makes a job read, resolved without opening anything."""

    field: str
    """The spec field, e.g. ``dataset.args.images_dir``."""
    given: str
    """The value as the spec gives it: what error messages may repeat."""
    path: Path
    """Absolute, with every symbolic link resolved: what the policy checks."""
    root: InputPath | None = None
    """For a sub-path, the root it must stay under."""

    @property
    def escapes_root(self) -> bool:
        """Whether a sub-path leads outside its root (through a symbolic link, say)."""
        return self.root is not None and not self.path.is_relative_to(self.root.path)

    def escape_error(self) -> SpecError:
        """The error for a sub-path that escapes its root; it names no file outside it."""
        root = self.root.field if self.root is not None else "its root"
        return SpecError(
            f"{self.field} {self.given!r} leads outside {root} (through a symbolic link); "
            f"keep everything the dataset reads inside {root}, without links out of it",
            field=self.field,
        )


def resolve_path(path: str | Path, field: str, given: str | None = None) -> Path:
    """``path`` made absolute with its symbolic links resolved, or a ``SpecError`` naming
    ``field`` (and only ``given``) when that is impossible (a loop of links, say)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        shown = str(path) if given is None else given
        raise SpecError(
            f"{field} {shown!r} cannot be resolved to a file or folder (a loop of symbolic "
            "links?); give a plain path",
            field=field,
        ) from None


def args_input_paths(args: BaseModel, prefix: str) -> list[InputPath]:
    """Every set path argument of a parsed argument model, roots first, resolved.

    ``prefix`` is where the arguments sit in the spec (``dataset.args``). Nothing is opened:
    only symbolic links are read, to find where each path really leads.
    """
    fields = type(args).model_fields
    roots: dict[str, InputPath] = {}
    subs: list[InputPath] = []
    for name, info in fields.items():
        value = getattr(args, name)
        if value is not None and isinstance(path_kind(info), InputPathMarker):
            field = f"{prefix}.{name}"
            roots[name] = InputPath(field, str(value), resolve_path(value, field))
    for name, info in fields.items():
        kind, value = path_kind(info), getattr(args, name)
        if value is None or not isinstance(kind, SubPathOf) or kind.root not in roots:
            continue
        root, field = roots[kind.root], f"{prefix}.{name}"
        resolved = resolve_path(root.path / kind.relative(value), field, given=str(value))
        subs.append(InputPath(field, str(value), resolved, root))
    return [*roots.values(), *subs]


def sub_path(args: BaseModel, name: str, prefix: str = "dataset.args") -> Path:
    """The resolved path of the sub-path argument ``name``; a ``SpecError`` when it leads
    outside its root. Dataset builders read through this, so a worker checks what the API did.
    """
    info = type(args).model_fields[name]
    kind = path_kind(info)
    if not isinstance(kind, SubPathOf):
        raise TypeError(f"{type(args).__name__}.{name} is not a sub-path argument")
    root_field = f"{prefix}.{kind.root}"
    root = InputPath(
        root_field, getattr(args, kind.root), resolve_path(getattr(args, kind.root), root_field)
    )
    value = str(getattr(args, name))
    field = f"{prefix}.{name}"
    item = InputPath(
        field, value, resolve_path(root.path / kind.relative(value), field, given=value), root
    )
    if item.escapes_root:
        raise item.escape_error()
    return item.path


def check_relative(relative: str, what: str) -> PurePath:
    """``relative`` as a path, when it is one a dataset may name inside its folder: not empty,
    not absolute, without ``..``; otherwise a ``DataError`` naming ``what`` (where the value
    came from: a COCO ``file_name``, a VOC ``<filename>`` or split id). Nothing is opened."""
    pure = PurePath(relative)
    if not relative or "\x00" in relative or pure.is_absolute() or ".." in pure.parts:
        raise DataError(
            f"{what} names {relative!r}; files a dataset names must be relative paths inside "
            "its folder, without '..'"
        )
    return pure


def file_under(folder: Path, relative: str, what: str) -> Path:
    """``folder/relative`` resolved, for a path read from the data itself; ``folder`` must
    already be resolved.

    A ``DataError`` naming ``what`` when ``relative`` is not a plain relative path
    (``check_relative``) or leads outside ``folder`` through a symbolic link; the message
    repeats the value, never where it leads.
    """
    pure = check_relative(relative, what)
    try:
        resolved = (folder / pure).resolve()
    except (OSError, RuntimeError, ValueError):
        resolved = None
    if resolved is None or not resolved.is_relative_to(folder):
        raise DataError(
            f"{what} names {relative!r}, which leads outside the dataset's folder (through a "
            "symbolic link); keep the dataset's files inside its folder"
        )
    return resolved
