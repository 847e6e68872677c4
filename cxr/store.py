"""Content-addressed file store: each file kept once, named by its sha256."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


@dataclass(frozen=True)
class Stored:
    sha256: str
    path: Path
    size_bytes: int


def safe_filename(name: str | None) -> str:
    """A display name from a client-supplied one: never a path.

    Only the last component is kept, separators and ``..`` are dropped, odd characters
    are replaced. The store never uses this name on disk; it is for people to read.
    """
    raw = (name or "").replace("\\", "/").split("/")[-1]
    cleaned = _UNSAFE.sub("_", raw).strip(" .")
    return (cleaned or "unnamed")[:255]


def blob_path(store_dir: Path, sha256: str) -> Path:
    return store_dir / sha256[:2] / sha256[2:4] / sha256


def _finalise(store_dir: Path, tmp: Path, digest: str, size: int) -> Stored:
    dest = blob_path(store_dir, digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        tmp.unlink(missing_ok=True)
    else:
        os.replace(tmp, dest)
    return Stored(sha256=digest, path=dest, size_bytes=size)


def put_stream(store_dir: Path, stream: BinaryIO, *, max_bytes: int | None = None) -> Stored:
    """Copy a stream into the store, hashing as it goes. Atomic: a partial file is never visible."""
    tmp_dir = store_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise ValueError(f"file is larger than the {max_bytes} byte limit")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _finalise(store_dir, tmp, h.hexdigest(), size)


def put_file(store_dir: Path, src: Path) -> Stored:
    """Copy a file into the store (the source is left in place)."""
    with src.open("rb") as f:
        return put_stream(store_dir, f)
