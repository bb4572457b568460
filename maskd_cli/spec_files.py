"""Reading a job spec file (YAML or JSON) for ``maskd run``, ``train-teacher`` and ``jobs submit``.

One loader for every command, and a strict one: specs come from other people, and YAML can
make a few hundred bytes expand into gigabytes through anchors and aliases (the "billion
laughs"). A job spec never needs either, so ``SpecLoader`` refuses them at the first one it
meets, before anything is expanded; the error names the line. Everything else is PyYAML's safe
subset: plain mappings, lists and scalars, no Python objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import Node


class SpecFileError(ValueError):
    """The file cannot be read, or is not YAML a job spec may be written in."""


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors (``&name``) and aliases (``*name``)."""

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise yaml.YAMLError(
                f"{where}job specs may not use YAML anchors (&name) or aliases (*name), which "
                "can multiply a small file into gigabytes; write each value out"
            )
        return super().compose_node(parent, index)


def read_spec_file(path: Path) -> Any:
    """The data in the spec file ``path``; ``SpecFileError`` says what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpecFileError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise SpecFileError(f"{str(path)!r} is not a UTF-8 text file") from None
    try:
        return yaml.load(text, Loader=SpecLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as error:
        raise SpecFileError(f"{str(path)!r} is not valid YAML for a job spec: {error}") from None
    except RecursionError:
        raise SpecFileError(
            f"{str(path)!r} nests lists or mappings too deeply to be a job spec"
        ) from None
