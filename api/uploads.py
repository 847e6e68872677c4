"""Upload handling for the API: body size limit, content sniffing, zip intake.

Client file names are never used as paths: files go into the content-addressed store
under their sha256, and names are kept only as display names (``cxr.store.safe_filename``).
Errors name files by their position, never by name (names may carry patient identifiers).
"""

from __future__ import annotations

import contextlib
import logging
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxr.dicom import is_dicom
from cxr.formats import MEDIA_TYPES, SNIFF_BYTES, sniff
from cxr.settings import get_settings
from cxr.store import Stored, put_stream

ACCEPTED = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}
ZIP_MAGIC = b"PK\x03\x04"
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (ZIP_MAGIC, "application/zip"),
    (b"PK\x05\x06", "application/zip"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF", "application/pdf"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"BM", "image/bmp"),
    (b"\x1f\x8b", "application/gzip"),
    (b"\x00\x00\x00\x0cjP  ", "image/jp2"),
)
log = logging.getLogger(__name__)


def detect(head: bytes) -> str:
    """The media type of a file from its first bytes (at least SNIFF_BYTES when the file has them)."""
    if not head:
        return "empty"
    if (kind := sniff(head)) is not None:  # the worker's own sniffer (cxr.formats): DICM first
        return MEDIA_TYPES[kind]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for magic, media in _SIGNATURES:
        if head.startswith(magic):
            return media
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain"


def peek(stream: BinaryIO) -> bytes:
    head = stream.read(SNIFF_BYTES)
    stream.seek(0)
    return head


def require_image(head: bytes, *, what: str) -> None:
    """415 unless the bytes are PNG, JPEG or DICOM (Part 10 or a bare data set); the message gives the detected type."""
    media = detect(head)
    if media not in ACCEPTED.values():
        raise HTTPException(415, f"{what} is {media}; only PNG, JPEG and DICOM files are accepted")


def too_large(limit_bytes: int) -> HTTPException:
    return HTTPException(413, f"the upload is larger than the limit of {limit_bytes / 1048576:g} MB "
                              "(CXR_MAX_UPLOAD_MB)")


class BodyLimit:
    """ASGI middleware: a request body larger than CXR_MAX_UPLOAD_MB gets 413.

    A declared Content-Length over the limit is refused before any byte is read; a body
    without one (chunked) is counted as it arrives and refused when it crosses the limit,
    so it is never read, let alone held in memory, beyond the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = get_settings().max_upload_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, counted, send)


async def _send_413(send: Send, limit: int) -> None:
    import json

    body = json.dumps({"detail": too_large(limit).detail}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Member:
    filename: str  # the member's last path component, for display only
    stored: Stored


def is_zip(head: bytes) -> bool:
    """A zip, unless 'DICM' at offset 128 says it is a DICOM file whose preamble starts with 'PK'."""
    return (head.startswith(ZIP_MAGIC) or head.startswith(b"PK\x05\x06")) and not is_dicom(head)


def member_problem(name: str) -> str | None:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if any(part == ".." for part in name.replace("\\", "/").split("/")):
        return "has '..' in its path"
    return None


def _skipped(info: zipfile.ZipInfo) -> bool:
    """Folders and macOS resource forks are not files anyone sent on purpose."""
    base = PurePosixPath(info.filename.replace("\\", "/")).name
    return info.is_dir() or info.filename.startswith("__MACOSX/") or base.startswith("._") or base == ".DS_Store"


# Compression methods Python's zipfile reads (APPNOTE.TXT 4.4.5): stored, deflate, bzip2, lzma.
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 12: "bzip2", 14: "LZMA", 93: "Zstandard", 95: "XZ",
                98: "PPMd", 99: "AES encryption"}


def member_unreadable(n: int, info: zipfile.ZipInfo) -> HTTPException | None:
    """Why member ``n`` (1-based) cannot be read, decided from its header, or None.

    Encrypted members (general purpose flag bit 0, APPNOTE.TXT 4.4.4) get 422: the zip is
    well formed but its content is locked. A compression method Python cannot decompress
    (Deflate64, PPMd, Zstandard, ...; APPNOTE.TXT 4.4.5) gets 415, an unsupported encoding.
    The member is named by its position only: names may carry patient identifiers."""
    if info.flag_bits & 0x1:
        return HTTPException(422, f"zip member {n} is encrypted (password-protected); send the zip without a "
                                  "password")
    if info.compress_type not in READABLE_METHODS:
        name = METHOD_NAMES.get(info.compress_type, "an unknown method")
        return HTTPException(415, f"zip member {n} uses compression method {info.compress_type} ({name}), which "
                                  "cannot be read; create the zip again with Deflate (the usual default) or Store")
    return None


@contextlib.contextmanager
def reading_member(n: int) -> Iterator[None]:
    """Turn any failure to read zip member ``n`` into a 400 naming it by position only.

    zipfile's own messages quote the member's name ("Bad CRC-32 for file 'x'"), so they are
    neither returned nor logged: only the exception type is."""
    try:
        yield
    except HTTPException:
        raise
    except OSError as e:
        if e.errno is not None:  # the disk or the spool failed (ENOSPC, EIO): not the client's zip
            raise
        raise _corrupt(n, e) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError,
            KeyError) as e:
        if isinstance(e, ValueError) and str(e).startswith("file is larger than"):  # put_stream: over its size
            raise HTTPException(400, f"zip member {n} expands beyond the size its header declares; the zip is "
                                     "corrupt or crafted, create it again") from None
        raise _corrupt(n, e) from None


def _corrupt(n: int, e: BaseException) -> HTTPException:
    log.warning("refused a zip: member %d cannot be read (%s)", n, type(e).__name__)
    return HTTPException(400, f"zip member {n} cannot be read: its data is corrupt or truncated (checksum or "
                              "compressed stream does not match); create the zip again and resend it")


#: Directory entries a zip may declare per accepted file: folders and macOS's `__MACOSX/._*`
#: twins are entries too, skipped (not counted) when the files are.
ZIP_ENTRIES_PER_MEMBER = 3
_EOCD, _ZIP64_LOCATOR, _ZIP64_EOCD = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"


def declared_entries(stream: BinaryIO) -> int | None:
    """The number of central-directory entries a zip declares, read from its end records
    alone (PKWARE APPNOTE 6.3.10: 4.3.16 end of central directory record; 4.3.15 and 4.3.14
    the Zip64 locator and record), without reading the directory itself. None when there is
    no end record (then it is not a readable zip at all). The stream is left at its start."""
    stream.seek(0, 2)
    size = stream.tell()
    tail_start = max(0, size - (22 + 65535))  # the record is 22 bytes plus a comment of at most 64 KiB
    stream.seek(tail_start)
    tail = stream.read()
    stream.seek(0)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return None
    entries = int.from_bytes(tail[at + 10:at + 12], "little")
    locator = at - 20
    if entries == 0xFFFF and locator >= 0 and tail[locator:locator + 4] == _ZIP64_LOCATOR:
        record_at = int.from_bytes(tail[locator + 8:locator + 16], "little")
        if 0 <= record_at < size:
            stream.seek(record_at)
            record = stream.read(56)
            stream.seek(0)
            if len(record) == 56 and record[:4] == _ZIP64_EOCD:
                entries = int.from_bytes(record[32:40], "little")
    return entries


def unpack_zip(stream: BinaryIO, *, store_dir, max_total_bytes: int, max_members: int) -> Iterator[Member]:
    """Store each file of a zip. Refuses (before storing anything) members with '..' or an
    absolute path, more than ``max_members`` files, or a declared total uncompressed size
    over ``max_total_bytes`` (zip bombs); each member is read only up to its declared size.

    Members that cannot be read: encrypted 422, unsupported compression 415, corrupt or
    truncated data (bad CRC-32, broken stream) 400; each named by position ("zip member 3"),
    never by name. Raises HTTPException.

    The number of entries is read from the zip's end record before its directory is parsed,
    so a directory of hundreds of thousands of empty entries (a few bytes each in the
    upload, hundreds of MB once parsed) is refused with 413 without being read."""
    entries = declared_entries(stream)
    if entries is not None and entries > ZIP_ENTRIES_PER_MEMBER * max_members:
        raise HTTPException(413, f"the zip declares {entries} entries; at most {max_members} files are accepted "
                                 "(CXR_MAX_ZIP_MEMBERS); send several smaller zips")
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        log.warning("refused a zip: its directory cannot be read (%s)", type(e).__name__)
        raise HTTPException(400, "the zip file cannot be read (no valid central directory: truncated or not a "
                                 "zip); create it again and resend it") from None
    with zf:
        infos = [i for i in zf.infolist() if not _skipped(i)]
        for n, info in enumerate(infos):
            problem = member_problem(info.filename)
            if problem:
                raise HTTPException(400, f"zip member {n + 1} {problem}; zip files must hold plain relative paths")
        if len(infos) > max_members:
            raise HTTPException(413, f"the zip holds {len(infos)} files; at most {max_members} are accepted "
                                     "(CXR_MAX_ZIP_MEMBERS)")
        total = sum(i.file_size for i in infos)
        if total > max_total_bytes:
            raise HTTPException(413, f"the zip expands to {total} bytes, over the limit of {max_total_bytes} "
                                     "(CXR_MAX_ZIP_UNCOMPRESSED_MB)")
        if not infos:
            raise HTTPException(400, "the zip holds no files")
        for n, info in enumerate(infos):
            if (refusal := member_unreadable(n + 1, info)) is not None:
                raise refusal
        for n, info in enumerate(infos):
            with reading_member(n + 1), zf.open(info) as f:
                require_image(f.read(SNIFF_BYTES), what=f"zip member {n + 1}")
        for n, info in enumerate(infos):
            with reading_member(n + 1), zf.open(info) as f:
                stored = put_stream(store_dir, f, max_bytes=info.file_size)
            yield Member(filename=PurePosixPath(info.filename.replace("\\", "/")).name, stored=stored)
