"""API keys kept in the database: generated here, stored only as a sha256.

Keys are 32 random bytes (``secrets.token_urlsafe``), so an unsalted sha256 cannot be
reversed or guessed; it lets the API look a key up by its hash."""

from __future__ import annotations

import hashlib
import secrets

PREFIX_LEN = 8


def generate() -> str:
    return "cxr_" + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def prefix_of(key: str) -> str:
    return key[:PREFIX_LEN + 4]
