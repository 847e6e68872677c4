"""DICOM headers without pixels, and the pseudonymised patient key. Torch-free (the API uses it).

Only the fields listed in :data:`HEADER_FIELDS` ever leave this module. PatientID is read
solely to compute a keyed hash (HMAC-SHA256) and PatientName is never read at all, so
neither can reach a database row, a log line or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

log = logging.getLogger(__name__)

# pydicom's reading validation puts offending values into warnings and log lines
# ("Invalid value for VR LO: '...'"), and a value could be a patient identifier. We read
# leniently and validate nothing on reading; the screening code checks what it uses.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
# When every decoder plugin fails on a corrupt file, pydicom logs each failure with a
# traceback at ERROR and then raises one RuntimeError naming them all. That error is what
# the study records and the worker logs (one line, with the cause), so the per-plugin
# tracebacks are not logged again here: they would only repeat that cause, as an alarming
# traceback, for a file that is simply corrupt.
logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)

DICM_OFFSET = 128

# DICOM keyword -> our column name, with the column's length.
HEADER_FIELDS: dict[str, tuple[str, int]] = {
    "StudyInstanceUID": ("study_instance_uid", 64),
    "SeriesInstanceUID": ("series_instance_uid", 64),
    "SOPInstanceUID": ("sop_instance_uid", 64),
    "AccessionNumber": ("accession_number", 64),
    "Modality": ("modality", 16),
    "BodyPartExamined": ("body_part", 64),
    "ViewPosition": ("view_position", 16),
    "PatientAge": ("patient_age", 16),
    "PatientSex": ("patient_sex", 16),
    "Manufacturer": ("manufacturer", 128),
}
UID_FIELDS = {"study_instance_uid", "series_instance_uid", "sop_instance_uid"}


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then 'DICM'."""
    return len(data) >= DICM_OFFSET + 4 and data[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    s = str(value).strip().strip("\x00").strip()
    return s or None


def header_fields(ds: pydicom.Dataset) -> dict[str, Any]:
    """The study metadata we keep, from a dataset: identity UIDs, acquisition fields and the
    image size. Never PatientID or PatientName. Values are trimmed to their column sizes;
    a UID longer than 64 characters is invalid and dropped."""
    out: dict[str, Any] = {}
    for keyword, (column, size) in HEADER_FIELDS.items():
        try:
            value = _text(ds.get(keyword))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeError) as e:  # keep the rest
            log.warning("DICOM element %s cannot be read (%s); left out", keyword, type(e).__name__)
            continue
        if value is None:
            continue
        if column in UID_FIELDS and (len(value) > 64 or not all(c.isdigit() or c == "." for c in value)):
            continue
        out[column] = value[:size]
    for keyword, column in (("Rows", "height"), ("Columns", "width")):
        v = ds.get(keyword)
        if isinstance(v, int):
            out[column] = v
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        out["transfer_syntax"] = str(ts)[:64]
    return out


def pseudonymise(patient_id: str | None, key: bytes) -> str | None:
    """The patient key: HMAC-SHA256(key, PatientID), hex. None for an empty PatientID.

    A keyed hash, not a plain one: patient IDs are short and guessable, so a plain hash
    could be reversed by trying them all. Without the key it cannot."""
    if not patient_id or not patient_id.strip():
        return None
    return hmac.new(key, patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class DicomHeader:
    fields: dict[str, Any]  # column name -> value, see header_fields
    patient_key: str | None

    @property
    def sop_instance_uid(self) -> str | None:
        return self.fields.get("sop_instance_uid")


def read_header(source: Path | bytes, *, key: bytes) -> DicomHeader | None:
    """The header of a DICOM file (pixels are not read), or None when the content is not
    DICOM or its header cannot be parsed (the worker then reports why)."""
    if isinstance(source, Path):
        with source.open("rb") as f:
            head = f.read(DICM_OFFSET + 4)
            if not is_dicom(head):
                return None
            f.seek(0)
            return _read(f, key)
    if not is_dicom(source):
        return None
    return _read(io.BytesIO(source), key)


def _read(fp: Any, key: bytes) -> DicomHeader | None:
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        fields = header_fields(ds)
        pid = _text(ds.get("PatientID"))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.info("DICOM header cannot be parsed at intake (%s); the worker will report it", type(e).__name__)
        return None
    return DicomHeader(fields=fields, patient_key=pseudonymise(pid, key))


# The pseudonym key --------------------------------------------------------------------


def load_or_create_key(key_file: Path) -> bytes:
    """The secret in ``key_file``; created (32 random bytes, hex, mode 0600) if it does not exist.

    Creation is atomic: the key is written to a temporary file and linked into place, so
    processes starting together (API, watcher, workers on a shared CXR_HOME) all end up
    with the same key."""
    try:
        return _read_key(key_file)
    except FileNotFoundError:
        pass
    key_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, key_file)
            log.warning("no CXR_PSEUDONYM_KEY set: generated a new pseudonym key in %s (mode 0600); "
                        "keep it, patient keys are only comparable under the same key", key_file)
        except FileExistsError:
            pass  # another process won the race; use its key
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(key_file)


def _read_key(key_file: Path) -> bytes:
    text = key_file.read_text().strip()
    if len(text) < 32:
        raise ValueError(f"pseudonym key file {key_file} holds fewer than 32 characters; "
                         "delete it to have a new one generated, or set CXR_PSEUDONYM_KEY")
    return text.encode("utf-8")


@lru_cache(maxsize=8)
def _cached_file_key(key_file: str) -> bytes:
    return load_or_create_key(Path(key_file))


def pseudonym_key(settings: Any) -> bytes:
    """The key from CXR_PSEUDONYM_KEY, else from (or generated into) $CXR_HOME/pseudonym.key."""
    if settings.pseudonym_key is not None:
        secret = settings.pseudonym_key.get_secret_value()
        if len(secret) < 16:
            raise ValueError("CXR_PSEUDONYM_KEY must be at least 16 characters; use e.g. `openssl rand -hex 32`")
        return secret.encode("utf-8")
    return _cached_file_key(str(settings.pseudonym_key_file))
