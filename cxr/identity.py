"""When two DICOM files with one SOP Instance UID are the same film. Torch-free (the API uses it).

A SOP Instance UID names one image (DICOM PS3.3 C.12.1.1.1; PS3.5 chapter 9 for UIDs). A
router that transcodes a film (say J2K to explicit VR little endian, PS3.5 section 10) keeps
the UID, so a second file with a known UID is usually a re-send. It is not when the UID was
reused by mistake: an anonymiser that maps UIDs badly, a modality that repeats them. Then a
second patient's film would vanish into the first one's study.

So a same-UID arrival is a **re-send** only when it agrees with the study that holds the UID:

- the same patient key (HMAC of PatientID, ``cxr.dicom``), StudyInstanceUID and
  SeriesInstanceUID, and
- the same pixels: the decoded pixel array (PS3.5 section 8), its shape and its photometric
  interpretation hash alike (:func:`pixel_fingerprint`), whatever the transfer syntax, so a
  lossless transcoding is a re-send and a different film is not.

Anything else is a **UID conflict**: the new film becomes its own study and is screened,
with the marker :data:`UID_CONFLICT` (a marker, not a rejection: see ``cxr.db.models.Study``)
and a sentence that says what differs (:func:`conflict_sentence`).

This module is the one home of that vocabulary. Rejection codes are elsewhere
(``worker.screening.gate.Code``): a marked study is screened as usual.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The marker of a study whose SOP Instance UID already belonged to a different film.
UID_CONFLICT = "uid_conflict"

#: What can differ between two files with one SOP Instance UID, and how a reader is told.
DIFFERENCES: dict[str, str] = {
    "patient": "another patient",
    "study_instance_uid": "another StudyInstanceUID",
    "series_instance_uid": "another SeriesInstanceUID",
    "pixels": "other pixels",
    "pixels_unknown": "pixels that could not be compared (one copy cannot be decoded)",
}

#: Header fields (study columns) that must agree for a re-send, by the difference they make.
_HEADER_FIELDS = (("patient_key", "patient"), ("study_instance_uid", "study_instance_uid"),
                  ("series_instance_uid", "series_instance_uid"))


_CHUNK = 1 << 20  # pixel values hashed per step


class PixelsUnavailable(ValueError):
    """The pixels of a file cannot be decoded here (no pixel data, corrupt, too large, no codec)."""


def header_differences(new: Mapping[str, Any], known: Mapping[str, Any]) -> list[str]:
    """Keys of :data:`DIFFERENCES` in which two headers with one SOP Instance UID disagree.

    ``new`` and ``known`` map study columns (``patient_key``, ``study_instance_uid``,
    ``series_instance_uid``) to values; a missing value is a value (absent on one side and
    present on the other differs). Returns an empty list when they agree."""
    return [name for column, name in _HEADER_FIELDS if (new.get(column) or None) != (known.get(column) or None)]


def pixel_fingerprint(path: Path, *, max_pixels: int) -> str:
    """sha256 (hex, 64 characters) of a DICOM file's decoded pixels.

    Hashes the shape (frames, rows, columns, samples), the photometric interpretation as
    decoded (pydicom turns YBR into RGB) and the pixel values as little-endian int64 (or
    float64 for float pixel data), so every lossless transfer syntax of one image (PS3.5
    section 10: implicit/explicit VR, deflated, big endian, RLE, JPEG-LS/J2K/JPEG lossless)
    gives the same digest and any changed pixel a different one. A bare data set (no Part 10
    header) is read as the worker reads it (``cxr.dicom.read_dataset``).

    Raises :class:`PixelsUnavailable` when the file has no decodable pixel data (not DICOM,
    no Pixel Data, corrupt, no codec installed) or declares more than ``max_pixels`` values
    (checked from the header before decoding)."""
    import numpy as np  # here, not at import: intake only decodes on a UID collision
    from pydicom.errors import InvalidDicomError

    from cxr.dicom import codestream_mismatch, read_dataset  # Part 10 or bare, as the worker reads it

    try:
        with Path(path).open("rb") as f:
            ds, _bare, _inferred = read_dataset(f)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise PixelsUnavailable("no pixel data")
        declared = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames") or 1) * int(
            ds.get("SamplesPerPixel") or 1)
        if declared > max_pixels:
            raise PixelsUnavailable(f"{declared} pixel values declared, above CXR_MAX_IMAGE_PIXELS={max_pixels}")
        if (mismatch := codestream_mismatch(ds)) is not None:  # a small header over a huge codestream
            raise PixelsUnavailable(mismatch)
        arr = np.asarray(ds.pixel_array)
    except PixelsUnavailable:
        raise
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            NotImplementedError, RuntimeError, MemoryError) as e:
        # RuntimeError: pydicom's "unable to decode" when every decoder failed or none is installed.
        raise PixelsUnavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric.startswith("YBR") and arr.ndim >= 3 and arr.shape[-1] == 3:
        photometric = "RGB"  # pydicom's default conversion on decoding
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    shape = (frames, int(ds.Rows), int(ds.Columns), samples)
    canonical = "<f8" if arr.dtype.kind == "f" else "<i8"
    digest = hashlib.sha256()
    digest.update(repr((shape, photometric, canonical)).encode("ascii"))
    flat = arr.reshape(-1)
    for start in range(0, flat.size, _CHUNK):  # 8 MB at a time, whatever the image size
        digest.update(flat[start:start + _CHUNK].astype(canonical).tobytes())
    return digest.hexdigest()


def film_key(header: Mapping[str, Any], *, pixels: str | None, sha256: str) -> str:
    """Which film a file is, among those sharing one SOP Instance UID: sha256 (hex) of its
    patient key, Study and Series UIDs and decoded-pixel hash (its bytes' sha256 when the
    pixels cannot be decoded, so such a file is never taken for another one)."""
    parts = [str(header.get(column) or "") for column, _ in _HEADER_FIELDS]
    parts.append(f"pixels:{pixels}" if pixels else f"bytes:{sha256}")
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def fingerprinter(*, max_pixels: int) -> Callable[[str], str | None]:
    """A cached ``path -> pixel_fingerprint or None`` for one intake: each file is decoded at
    most once, and a file that cannot be decoded gives None (logged with the reason, never a
    patient identifier)."""
    cache: dict[str, str | None] = {}

    def fingerprint(path: str) -> str | None:
        if path not in cache:
            try:
                cache[path] = pixel_fingerprint(Path(path), max_pixels=max_pixels)
            except PixelsUnavailable as e:
                log.info("pixels of %s not compared: %s", Path(path).name, e)
                cache[path] = None
        return cache[path]

    return fingerprint


def conflict_sentence(*, sop_instance_uid: str, owner_id: Any, differences: Sequence[str]) -> str:
    """``"uid_conflict: <what happened and what to do>"`` for a film screened as its own study
    although its SOP Instance UID already belonged to study ``owner_id``."""
    what = ", ".join(DIFFERENCES.get(d, d) for d in differences) or "a different film"
    return (f"{UID_CONFLICT}: SOP Instance UID {sop_instance_uid} already belongs to study {owner_id}, "
            f"but this file has {what}; it is screened as its own study. Two films must not share a SOP "
            "Instance UID: check the UID mapping of the sending modality or anonymiser")


def owner_note(*, sop_instance_uid: str, newcomer_id: Any, differences: Sequence[str]) -> str:
    """The audit note left on the study that owns a UID when a different film claims it."""
    what = ", ".join(DIFFERENCES.get(d, d) for d in differences) or "a different film"
    return (f"{UID_CONFLICT}: a later file with this SOP Instance UID {sop_instance_uid} has {what}; "
            f"it is study {newcomer_id}, screened on its own")
