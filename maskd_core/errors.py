"""Errors the core raises, grouped by who can fix them.

The service maps each class onto a job failure kind, so the split matters:
``SpecError`` is the submitter's to fix before training (HTTP 422), ``DataError`` is found while
training and is still the user's (FAILED, kind ``user``), and ``JobCancelled`` is the cooperative
stop a user asked for. Anything else escaping the core is treated as an infrastructure failure.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MaskdError(Exception):
    """Base class of every error the core raises on purpose."""


class SpecError(MaskdError, ValueError):
    """The job spec cannot run as written. The message says what is wrong and how to fix it.

    ``field`` is the dotted path of the offending spec field (e.g. ``teacher.layers[1]``), so the
    API can point at it the way pydantic does for structural errors.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownNameError(SpecError):
    """A name (model, layer, dataset, task, method) is not one of the known choices."""

    def __init__(
        self, kind: str, name: str, choices: Iterable[str], field: str | None = None
    ) -> None:
        options = sorted(choices)
        close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(options[:40]) + (" ..." if len(options) > 40 else "")
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {listing}", field=field)
        self.kind = kind
        self.name = name
        self.close_matches = close


class DataError(MaskdError):
    """The data a job points at cannot be read or does not match the task (user-fixable)."""


class JobCancelled(MaskdError):  # noqa: N818 - it is a signal, not a failure
    """Raised inside a stage after a cooperative stop was requested and a checkpoint written."""

    def __init__(self, stage: str, step: int) -> None:
        super().__init__(f"cancelled during {stage} at step {step}")
        self.stage = stage
        self.step = step
