"""A small decorator registry, the way timm's ``register_model`` works.

Models, tasks, datasets and distillation methods are chosen by name in the job spec. Each kind
keeps one ``Registry``; an entry pairs the builder with a pydantic model of its arguments, so
a spec's ``args`` are checked (and documented in the API schema) before anything is built.
Arguments that name files or folders have the types of ``maskd_core.paths``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from maskd_core.errors import SpecError, UnknownNameError

T = TypeVar("T")


MAX_LISTED_PROBLEMS = 10
"""How many invalid arguments an error message lists; it counts the rest."""


class NoArgs(BaseModel):
    """Argument model for entries that take no arguments."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class DefaultTaps:
    """Where a model is distilled when a spec names no ``layers``: what its family's MasKD
    recipe taps (a detector's FPN levels, a segmentation model's logits).

    The strides are declared beside the layers because pairing a teacher and a student on their
    defaults is only sound when their levels sit at the same strides, and a refusal must say
    which; ``tests/maskd_core/models/test_default_taps.py`` checks them against a forward.
    """

    layers: tuple[str, ...]
    strides: tuple[tuple[int, ...], ...]
    """Per layer, the stride of each level it gives, relative to the image the network sees
    (after a detector's own resize)."""
    aux: str | None = None
    """The module of the auxiliary head's logits when the model can have one (built with
    ``aux_loss``): what MasKD's ``aux_weight`` distils beside the layers."""

    def __post_init__(self) -> None:
        if not self.layers or len(self.strides) != len(self.layers):
            raise ValueError("default taps need one tuple of level strides per layer")

    def stride_of(self, layer: str, level: int) -> int | None:
        """The declared stride of level ``level`` of ``layer``; None for a layer not tapped by
        default (a spec's own choice, whose stride only its sizes tell)."""
        if layer not in self.layers:
            return None
        strides = self.strides[self.layers.index(layer)]
        return strides[level] if level < len(strides) else None


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    args: type[BaseModel]
    summary: str
    family: str | None = None
    """The family the entry belongs to, whose structure and shared defaults follow it (a
    detector's: ``retinanet``, ``fcos``, ``two_stage``); None when it has none."""
    taps: DefaultTaps | None = None
    """A model's default taps (``ModelSpec.layers`` left out); None for other kinds."""


class Registry(Generic[T]):
    """Name → object, with typed arguments and helpful errors for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        args: type[BaseModel] = NoArgs,
        summary: str = "",
        family: str | None = None,
        taps: DefaultTaps | None = None,
    ) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = summary or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(
                name=name, obj=obj, args=args, summary=doc, family=family, taps=taps
            )
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
            errors = exc.errors()
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(args)'}: {err['msg']}"
                for err in errors[:MAX_LISTED_PROBLEMS]
            )
            if len(errors) > MAX_LISTED_PROBLEMS:  # a message, not an echo of a hostile input
                problems += f"; and {len(errors) - MAX_LISTED_PROBLEMS} more"
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
