"""Listing a dataset's folders within bounds: so many entries, so many seconds.

Building a dataset is part of validating a job, which the API does while the submitter waits,
so a folder that holds a whole file system (``root: /usr``, ``images_dir: .``) must fail fast
rather than tie up a server thread. Every listing goes through ``list_files``: at most
``MAX_FOLDER_ENTRIES`` entries per folder tree, and at most ``MAX_SCAN_SECONDS`` for all the
listings of one dataset (one ``ScanDeadline``). Either limit is a ``SpecError`` that names the
field and the limit. Symbolic links to folders are not followed (as ``Path.rglob`` does not);
a linked file counts only when it resolves inside the dataset's root.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from maskd_core.errors import SpecError

MAX_FOLDER_ENTRIES = 250_000
"""The most entries (files and folders, matching or not) one folder tree may hold."""
MAX_SCAN_SECONDS = 15.0
"""The most time the listings of one dataset may take."""


class ScanDeadline:
    """The time the listings of one dataset build may still take."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = MAX_SCAN_SECONDS if seconds is None else seconds
        self._ends = time.monotonic() + self.seconds

    def check(self, field: str) -> None:
        if time.monotonic() > self._ends:
            raise SpecError(
                f"reading the dataset's folders took longer than {self.seconds:g} s, the most "
                f"validation may spend on them; point {field} at a folder that holds only the "
                "dataset",
                field=field,
            )


def list_files(
    folder: Path,
    *,
    suffixes: frozenset[str],
    within: Path,
    field: str,
    deadline: ScanDeadline,
    recursive: bool = True,
) -> list[Path]:
    """The files under ``folder`` whose suffix (lower-cased) is in ``suffixes``, sorted.

    ``folder`` and ``within`` (the dataset's root) are resolved paths. A symbolic link to a
    matching file is listed when it resolves inside ``within`` and refused otherwise; links
    to folders are not followed. Errors name ``field`` and paths relative to ``folder`` only.
    """
    limit = MAX_FOLDER_ENTRIES
    seen = 0
    found: list[Path] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = os.scandir(current)
        except OSError as exc:
            where = "the folder" if current == folder else repr(str(current.relative_to(folder)))
            raise SpecError(
                f"{field}: cannot list {where} ({exc.strerror or type(exc).__name__}); give a "
                "folder the workers can read",
                field=field,
            ) from None
        with entries:
            for entry in entries:
                seen += 1
                if seen > limit:
                    raise SpecError(
                        f"{field}: the folder holds more than {limit} files and folders, the "
                        "most a dataset folder may hold; point it at a folder that holds only "
                        "the dataset",
                        field=field,
                    )
                deadline.check(field)
                path = Path(entry.path)
                matches = path.suffix.lower() in suffixes
                if entry.is_symlink():
                    if matches and _linked_file_inside(path, folder, within, field):
                        found.append(path)
                elif entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append(path)
                elif matches and entry.is_file(follow_symlinks=False):
                    found.append(path)
    return sorted(found)


def _linked_file_inside(link: Path, folder: Path, within: Path, field: str) -> bool:
    """Whether a symbolic link leads to a file; a ``SpecError`` when it leads outside
    ``within``. The message names the link (inside the tenant's folder), never its target."""
    try:
        target = link.resolve()
    except (OSError, RuntimeError):
        return False
    if not target.is_relative_to(within):
        raise SpecError(
            f"{field}: {str(link.relative_to(folder))!r} is a symbolic link that leads outside "
            "the dataset's root; a dataset may only link to files inside its root",
            field=field,
        )
    return target.is_file()
