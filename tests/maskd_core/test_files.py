"""Atomic writes and remembered hashes of job files."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from maskd_core.files import atomic_write_text, file_sha256

CLOCK_TICK_SECONDS = 0.05
"""More than the coarse kernel clock tick that file times advance by (at most 10 ms)."""


def test_a_file_hash_is_remembered_only_while_the_file_is_unchanged(tmp_path: Path) -> None:
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"first")
    assert file_sha256(weights) == file_sha256(str(weights)) == hashlib.sha256(b"first").hexdigest()

    time.sleep(CLOCK_TICK_SECONDS)
    with weights.open("r+b") as handle:  # in place, same size, same inode
        handle.write(b"again")
    assert file_sha256(weights) == hashlib.sha256(b"again").hexdigest()

    before = weights.stat()
    atomic_write_text(weights, "third")  # a new file renamed over the old one
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file_sha256(weights) == hashlib.sha256(b"third").hexdigest()
    link = tmp_path / "link.pt"
    link.symlink_to(weights)
    assert file_sha256(link) == file_sha256(weights)
