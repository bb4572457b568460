"""Writing job files so that no reader ever sees half of one, and hashing them in constant memory.

Every file a job leaves behind (checkpoints, tokens, the student, summaries, the comparison
table) is read by another process at some point: a resumed attempt, the worker's registration
step, the API. A crash mid-write must therefore leave the previous version or nothing, never a
truncated file, so each write goes to a temporary name in the same folder, is flushed to disk and
renamed over the target. Weights can be gigabytes, so hashes stream them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

HASH_CHUNK_BYTES = 1 << 20


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Indented and key-sorted, so two runs' files diff line by line."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
