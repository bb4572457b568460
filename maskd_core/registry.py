"""A small decorator registry, the way timm's ``register_model`` works.

Models, tasks, datasets and distillation methods are chosen by name in the job spec. Each kind
keeps one ``Registry``; an entry pairs the builder with a pydantic model of its arguments, so
a spec's ``args`` are checked (and documented in the API schema) before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from maskd_core.errors import SpecError, UnknownNameError

T = TypeVar("T")


class InputPathMarker:
    """Marks an argument that names a file or folder the job reads on the worker.

    The core only reports such paths (``maskd_core.validate.input_paths``); which folders a
    job may read is the service's policy, so that one tenant cannot point a job at another's
    files.
    """


LocalPath = Annotated[str, InputPathMarker()]
"""An argument naming a local file or folder the job reads (weights, dataset roots)."""


def input_path_values(args: BaseModel) -> dict[str, str]:
    """The ``LocalPath`` arguments of a parsed argument model that are set, by field name."""
    found: dict[str, str] = {}
    for name, info in type(args).model_fields.items():
        value = getattr(args, name)
        if value is not None and _marks_input_path(info.annotation, info.metadata):
            found[name] = str(value)
    return found


def _marks_input_path(annotation: Any, metadata: Sequence[Any] = ()) -> bool:
    """Whether a field's type carries the marker, also inside ``LocalPath | None``."""
    if any(isinstance(m, InputPathMarker) for m in metadata):
        return True
    if get_origin(annotation) is Annotated:
        return _marks_input_path(None, get_args(annotation)[1:])
    return any(_marks_input_path(arg) for arg in get_args(annotation))


class NoArgs(BaseModel):
    """Argument model for entries that take no arguments."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    args: type[BaseModel]
    summary: str


class Registry(Generic[T]):
    """Name → object, with typed arguments and helpful errors for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, args: type[BaseModel] = NoArgs, summary: str = ""
    ) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = summary or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(name=name, obj=obj, args=args, summary=doc)
            return obj

        return add

    def entry(self, name: str, field: str | None = None) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries, field=field) from None

    def get(self, name: str, field: str | None = None) -> T:
        return self.entry(name, field).obj

    def parse_args(self, name: str, args: Mapping[str, Any], field: str | None = None) -> BaseModel:
        """Validate ``args`` against the entry's argument model, as a ``SpecError`` on failure."""
        entry = self.entry(name, field)
        try:
            return entry.args.model_validate(dict(args))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(args)'}: {err['msg']}"
                for err in exc.errors()
            )
            allowed = ", ".join(entry.args.model_fields) or "none"
            raise SpecError(
                f"invalid arguments for {self.kind} {name!r}: {problems}. Allowed arguments: "
                f"{allowed}",
                field=field,
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[name] for name in self.names())
