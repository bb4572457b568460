"""Writing job files so that no reader ever sees half of one, and hashing them in constant memory.

Every file a job leaves behind (checkpoints, tokens, the student, summaries, the comparison
table) is read by another process at some point: a resumed attempt, the worker's registration
step, the API. A crash mid-write must therefore leave the previous version or nothing, never a
truncated file, so each write goes to a temporary name in the same folder, is flushed to disk and
renamed over the target. Weights can be gigabytes, so hashes stream them, once per process
while the file is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

HASH_CHUNK_BYTES = 1 << 20
HASHES_REMEMBERED = 256


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
    """The SHA-256 of a file's content, remembered per process while the file is unchanged.

    An attempt of a job hashes the teacher's weights several times (the stage-1 fingerprint,
    the tokens' and the evaluations' teacher identity), and a worker process runs many jobs;
    weights of hundreds of megabytes take a good part of a second each time. So the digest is
    kept under the file's identity and change times (device, inode, size, and modification and
    status-change times in nanoseconds). Any write moves the status-change time, which no
    program can set back, to the kernel's current clock tick, and replacing the file (as
    ``atomic_write`` does) gives it a new inode, so a changed file is hashed again; only
    rewriting it in place, at the same size, within the tick of its last hash would not be seen.
    """
    target = Path(path).resolve()
    status = target.stat()
    return _sha256_of_unchanged(
        target,
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


@functools.lru_cache(maxsize=HASHES_REMEMBERED)
def _sha256_of_unchanged(path: Path, *identity: int) -> str:
    """The hash itself; ``identity`` (what ``file_sha256`` read from ``stat``) keys the cache."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
