"""Fetch a Kaggle dataset and normalise it into ``DEST/<ClassName>/*``.

Kaggle archives of chest X-ray sets come in many layouts (train/test/val folders,
upper/lower-case class names, nested zips' top folders). ``normalise_archive`` flattens
any of them by class name, keeping every image once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}



class DownloadError(RuntimeError):
    pass


def class_for(member: str, classes: list[str]) -> str | None:
    """The class named by any folder in the member's path (case-insensitive), else None."""
    parts = [p.lower() for p in PurePosixPath(member).parts[:-1]]
    for c in classes:
        if c.lower() in parts:
            return c
    return None


def normalise_archive(archive: Path, dest: Path, classes: list[str]) -> dict[str, int]:
    """Extract the images of a zip into ``dest/<Class>/``. Unsafe member names are refused,
    images outside any class folder are skipped, identical bytes are kept once."""
    counts = {c: 0 for c in classes}
    seen: set[str] = set()
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            name = info.filename
            if info.is_dir() or PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if "__MACOSX" in PurePosixPath(name).parts or PurePosixPath(name).name.startswith("._"):
                continue  # macOS resource forks, not images
            if name.startswith("/") or ".." in PurePosixPath(name).parts:
                raise DownloadError(f"archive member with an unsafe path: {name!r}")
            cls = class_for(name, classes)
            if cls is None:
                continue
            data = z.read(info)
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            out = dest / cls / f"{digest[:16]}{PurePosixPath(name).suffix.lower()}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            counts[cls] += 1
    if not any(counts.values()):
        raise DownloadError(f"{archive.name} has no images under folders named {classes}")
    return counts


def has_credentials() -> bool:
    return bool(os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")) or (
        Path.home() / ".kaggle" / "kaggle.json").exists()


def download(dataset: str, dest: Path, classes: list[str]) -> dict[str, int]:
    """Download with the kaggle package's API, then normalise. Needs credentials and network."""
    if not has_credentials():
        raise DownloadError(
            "Kaggle credentials not found. Set KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json "
            "in ~/.kaggle/ (Kaggle > Settings > API > Create New Token)."
        )
    from kaggle.api.kaggle_api_extended import KaggleApi  # imported late: it authenticates on import

    api = KaggleApi()
    api.authenticate()
    raw = dest / ".download"
    raw.mkdir(parents=True, exist_ok=True)
    try:
        api.dataset_download_files(dataset, path=str(raw), unzip=False, quiet=False)
    except Exception as e:  # network, 403/404: re-raised with what to do
        raise DownloadError(f"download of {dataset} failed ({type(e).__name__}: {e}); check the dataset "
                            "name, your network and that you accepted the dataset's rules on kaggle.com") from e
    archives = sorted(raw.glob("*.zip"))
    if not archives:
        raise DownloadError(f"no zip archive arrived in {raw}")
    totals = {c: 0 for c in classes}
    for a in archives:
        for c, n in normalise_archive(a, dest, classes).items():
            totals[c] += n
    return totals
