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
import pydicom.encaps
from pydicom.datadict import dictionary_has_tag
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
#: How many leading bytes the sniffers read: the preamble and 'DICM', or the first elements of a
#: bare data set.
SNIFF_BYTES = 256

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
    """A DICOM Part 10 file: 128-byte preamble (any bytes, even 'PK' or a TIFF header), then 'DICM'."""
    return len(data) >= DICM_OFFSET + 4 and data[DICM_OFFSET:DICM_OFFSET + 4] == b"DICM"


# Value representations (PS3.5 6.2) and those with a 4-byte length in explicit VR (PS3.5 7.1.2).
_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR "
                 b"US UT UV".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
#: Groups a bare data set may start with: file meta (0002), identification (0008), patient
#: (0010), acquisition (0018), relationship (0020), image presentation (0028).
_FIRST_GROUPS = frozenset({0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028})
_UNDEFINED = 0xFFFFFFFF


def bare_dicom_encoding(head: bytes) -> str | None:
    """'implicit' or 'explicit' when ``head`` (the first bytes of a file, 256 or more) starts a
    bare DICOM data set in little endian: no preamble, no 'DICM', no file meta, as older PACS,
    ACR-NEMA-style and planning-system exports write (PS3.5 7.1). Else None.

    The first tag must be of a group a data set starts with (0002, 0008, 0010, 0018, 0020,
    0028); then every element inside ``head`` is walked: tags strictly ascending, public tags
    known to the data dictionary (PS3.6), explicit VRs valid, lengths even. At least two
    element headers must be read, or one of undefined length followed by a sequence item.
    Text and other formats fail at once."""
    if len(head) < 8 or int.from_bytes(head[0:2], "little") not in _FIRST_GROUPS:
        return None
    explicit = head[4:6] in _VRS
    pos, last, seen = 0, -1, 0
    while pos + 8 <= len(head):
        group, elem = int.from_bytes(head[pos:pos + 2], "little"), int.from_bytes(head[pos + 2:pos + 4], "little")
        tag = (group << 16) | elem
        if tag <= last or group == 0 or group > 0x7FE0:
            return None
        if group % 2 == 0 and elem != 0 and not dictionary_has_tag(tag):
            return None
        last = tag
        if explicit:
            vr = head[pos + 4:pos + 6]
            if vr not in _VRS:
                return None
            if vr in _LONG_VRS:
                if pos + 12 > len(head):
                    break
                if head[pos + 6:pos + 8] != b"\x00\x00":
                    return None
                length, start = int.from_bytes(head[pos + 8:pos + 12], "little"), pos + 12
            else:
                length, start = int.from_bytes(head[pos + 6:pos + 8], "little"), pos + 8
        else:
            length, start = int.from_bytes(head[pos + 4:pos + 8], "little"), pos + 8
        seen += 1
        if length == _UNDEFINED:  # a sequence: an item (or the end of the sequence) must follow
            if head[start:start + 4] in (b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"):
                seen += 1
            break
        if length % 2:
            return None
        pos = start + length
    if seen >= 2:
        return "explicit" if explicit else "implicit"
    return None


def is_any_dicom(head: bytes) -> bool:
    """Part 10 (``DICM`` at offset 128) or a bare little endian data set."""
    return is_dicom(head) or bare_dicom_encoding(head) is not None


def read_dataset(fp: Any, *, stop_before_pixels: bool = False) -> tuple[pydicom.Dataset, bool, bool]:
    """(data set, bare, inferred): a Part 10 file, or a bare data set read with ``force=True``.
    When the file meta holds no Transfer Syntax UID (a bare data set, or a Part 10 file whose
    writer left (0002,0010) out; PS3.10 7.1 requires it), the syntax is inferred from the data
    set's own encoding (implicit or explicit VR little endian), put in its file meta so it
    decodes like any other file, and ``inferred`` is True.
    Raises InvalidDicomError and what pydicom raises for a corrupt file."""
    head = fp.read(DICM_OFFSET + 4)
    fp.seek(0)
    bare = not is_dicom(head)
    ds = pydicom.dcmread(fp, force=bare, stop_before_pixels=stop_before_pixels)
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = pydicom.dataset.FileMetaDataset()
    inferred = not meta.get("TransferSyntaxUID")
    if inferred:
        implicit, little = ds.original_encoding
        if not little:
            raise InvalidDicomError("a data set in big endian without a Transfer Syntax UID is not supported")
        meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit
                                  else pydicom.uid.ExplicitVRLittleEndian)
    return ds, bare, inferred


# Encapsulated syntaxes whose codestream declares its own image size (PS3.5 8.2, A.4).
_JPEG_FAMILY = ("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.8")
_J2K_FAMILY = ("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOFn (T.81 B.1.1.3), SOF55 (JPEG-LS)


def codestream_size(first_fragment: bytes, transfer_syntax: str) -> tuple[int, int, int] | None:
    """(columns, rows, components) as the compressed codestream itself declares them: the JPEG
    or JPEG-LS SOF segment (ITU-T T.81 B.2.2, T.87 C.2.2), or the JPEG 2000 / HTJ2K SIZ
    segment (ITU-T T.800 A.5.1: Xsiz - XOsiz, Ysiz - YOsiz, Csiz). None when the syntax has
    no such header or it is not found in the first fragment (the decoder then decides)."""
    ts = str(transfer_syntax)
    data = bytes(first_fragment[:65536])
    if ts.startswith(_J2K_FAMILY):
        at = data.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (a JP2 wrapper may come first)
        if at < 0 or len(data) < at + 42:
            return None
        xsiz, ysiz, xosiz, yosiz = (int.from_bytes(data[at + 8 + 4 * i:at + 12 + 4 * i], "big") for i in range(4))
        csiz = int.from_bytes(data[at + 40:at + 42], "big")
        return max(0, xsiz - xosiz), max(0, ysiz - yosiz), csiz
    if ts.startswith(_JPEG_FAMILY):
        i = 2 if data[:2] == b"\xff\xd8" else -1
        while 0 < i and i + 10 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:
                i += 1
                continue
            if marker in _SOF:
                return (int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big"),
                        data[i + 9])
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def codestream_mismatch(ds: pydicom.Dataset) -> str | None:
    """A sentence when the first frame's compressed codestream declares more pixels than the
    header's Rows x Columns x Samples per Pixel (PS3.5 8.2 requires them to agree), else None.
    Checked before decoding: a decoder allocates what the codestream says, so a small header
    over a huge codestream would go around every limit taken from the header."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not ts or not str(ts).startswith(_JPEG_FAMILY + _J2K_FAMILY) or "PixelData" not in ds:
        return None
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        fragments = next(pydicom.encaps.generate_fragmented_frames(ds.PixelData, number_of_frames=frames))
        size = codestream_size(fragments[0], str(ts))
    except (StopIteration, ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError):
        return None  # the decoder reports a broken encapsulation with its own reason
    rows, cols, samples = ds.get("Rows"), ds.get("Columns"), int(ds.get("SamplesPerPixel") or 1)
    if size is None or not isinstance(rows, int) or not isinstance(cols, int):
        return None
    width, height, components = size
    if width * height * max(1, components) <= cols * rows * max(1, samples):
        return None
    return (f"the compressed image declares {width}x{height} pixels with {components} component(s), more than the "
            f"{cols}x{rows} with {samples} the header gives; the file is inconsistent (corrupt or crafted) and is "
            "refused before decoding, send it again")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    # No NUL anywhere: DICOM pads with it, some writers embed it, and Postgres text cannot hold it
    # (the study row could not be written: a 500, or a watched file retried for ever).
    s = str(value).replace("\x00", "").strip()
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


#: Free-text fields read only for the gate's anatomy check; never stored, logged or shown.
ANATOMY_TEXT_FIELDS = ("StudyDescription", "SeriesDescription", "ProtocolName")


def anatomy_fields(ds: pydicom.Dataset) -> dict[str, Any]:
    """What the header says about the body part besides BodyPartExamined, for the gate
    (``worker.screening.gate.check_anatomy``): the description fields (first 64 characters),
    and the Anatomic Region Sequence as (code value, code meaning) pairs (PS3.3 C.8.4.6 /
    C.4.8). Unreadable elements are left out."""
    out: dict[str, Any] = {}
    for keyword in ANATOMY_TEXT_FIELDS:
        try:
            value = _text(ds.get(keyword))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeError):
            continue
        if value:
            out[keyword] = value[:64]
    try:
        seq = ds.get("AnatomicRegionSequence") or []
        codes = [(_text(item.get("CodeValue")) or _text(item.get("LongCodeValue")), _text(item.get("CodeMeaning")))
                 for item in seq]
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeError):
        codes = []
    if codes := [c for c in codes if c[0] or c[1]]:
        out["AnatomicRegionSequence"] = codes
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
            head = f.read(SNIFF_BYTES)
            if not is_any_dicom(head):
                return None
            f.seek(0)
            return _read(f, key)
    if not is_any_dicom(source[:SNIFF_BYTES]):
        return None
    return _read(io.BytesIO(source), key)


def _read(fp: Any, key: bytes) -> DicomHeader | None:
    try:
        ds, _bare, _inferred = read_dataset(fp, stop_before_pixels=True)
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
