"""API keys: how they are made, stored and checked.

A key looks like ``mk_<prefix>_<secret>``. The prefix is public and indexed, so a lookup is one
row; only the SHA-256 hash of the whole key is stored, so a leaked database does not leak usable
keys. Keys carry 256 random bits, which is why a fast hash (not a password KDF) is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_SCHEME = "mk"
PREFIX_BYTES = 6
SECRET_BYTES = 32


@dataclass(frozen=True)
class GeneratedKey:
    plaintext: str
    prefix: str
    key_hash: str


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> GeneratedKey:
    """A new random key; ``plaintext`` is shown to the user once and never stored."""
    prefix = secrets.token_hex(PREFIX_BYTES)
    plaintext = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    return GeneratedKey(plaintext=plaintext, prefix=prefix, key_hash=hash_api_key(plaintext))


def key_prefix(key: str) -> str | None:
    """The lookup prefix of a well-formed key, or None for anything else."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not parts[1] or not parts[2]:
        return None
    return parts[1]


def key_matches(key: str, stored_hash: str) -> bool:
    """Constant-time comparison, so response times do not reveal how much of a hash matched."""
    return hmac.compare_digest(hash_api_key(key), stored_hash)
