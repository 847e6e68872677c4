"""Is a file complete, or was it cut short? A cheap structural check, no pixel decoding.

The watcher asks this before it lets a file leave the inbox: a copy that stalled and was
taken for finished ends early, and its format usually says so.

- PNG (ISO/IEC 15948, section 5.3): chunks are walked by their lengths; complete when the
  ``IEND`` chunk is reached inside the file.
- JPEG (ITU-T T.81, annex B): marker segments are walked by their lengths, entropy-coded
  data is skipped to the next marker (``FF`` followed by neither ``00`` nor ``RSTn``);
  complete when ``EOI`` (``FF D9``) is reached.
- DICOM Part 10 (PS3.10 section 7.1, PS3.5 sections 7.1, 7.5 and A.4): the file meta group
  gives the transfer syntax, then every top-level data element is walked by its length;
  undefined lengths (sequences, encapsulated pixel data) are followed item by item to their
  Sequence Delimitation Item. Complete when the top-level Pixel Data element ends inside the
  file (what follows it, such as trailing padding or a stray byte some writers append, is not
  needed to screen the film and is not checked), or else when the last element ends exactly
  at the end of the file and, for an image (Rows present), Pixel Data was reached. A deflated data set
  (1.2.840.10008.1.2.1.99) is complete when its deflate stream ends.
- A bare DICOM data set (no preamble, 'DICM' or file meta; ``cxr.dicom.bare_dicom_encoding``)
  is walked the same way in the implicit or explicit VR little endian its elements show.
- Anything else is complete unless it is empty or too short to be told apart from the
  start of one of these (under 132 bytes, the DICOM preamble and prefix).

A file this check calls complete can still be corrupt (bad compressed data): the worker's
decoder decides that. Structure this check cannot follow (a malformed header) counts as
complete, so that it is never the reason a file waits forever.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

from cxr.dicom import SNIFF_BYTES, bare_dicom_encoding

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_PREFIX_END = 132  # 128-byte preamble + "DICM"

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_ROWS = 0x00280010
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32


class _Cut(Exception):
    """The file ends inside a structure: the message says where."""


class _Odd(Exception):
    """Structure this check does not follow: no verdict."""


def incomplete(f: BinaryIO, size: int) -> str | None:
    """Why the file open as ``f`` (``size`` bytes) looks cut short, or None if it looks whole.

    Reads from the start of ``f`` (its position is left anywhere). Never raises for content;
    raises OSError only if reading fails. The sentence names the format and where it ends.
    """
    if size == 0:
        return "the file is empty (0 bytes)"
    f.seek(0)
    head = f.read(DICOM_PREFIX_END)
    try:
        # 'DICM' first: a Part 10 preamble may hold anything, a PNG or JPEG signature included (PS3.10 7.1).
        if len(head) >= DICOM_PREFIX_END and head[128:132] == b"DICM":
            return _dicom(f, size)
        if head.startswith(PNG_MAGIC):
            return _png(f, size)
        if head.startswith(JPEG_MAGIC):
            f.seek(0)
            return _jpeg(f.read())
        f.seek(0)
        if (encoding := bare_dicom_encoding(f.read(SNIFF_BYTES))) is not None:
            return _bare_dicom(f, size, implicit=encoding == "implicit")
    except _Cut as cut:
        return str(cut)
    except _Odd:
        return None
    if size < DICOM_PREFIX_END and (PNG_MAGIC.startswith(head) or JPEG_MAGIC.startswith(head)
                                    or head.strip(b"\0") == b""
                                    or (len(head) >= 128 and b"DICM".startswith(head[128:]))):
        return f"the file has only {size} bytes, the start of a PNG, JPEG or DICOM file at most"
    return None


def _png(f: BinaryIO, size: int) -> None:
    pos = len(PNG_MAGIC)
    while True:
        if pos + 8 > size:
            raise _Cut(f"the PNG ends before its IEND chunk (cut at byte {size})")
        f.seek(pos)
        length, kind = struct.unpack(">I4s", f.read(8))
        end = pos + 12 + length
        if end > size:
            raise _Cut(f"the PNG ends inside a {kind.decode('latin-1')!r} chunk ({size} of {end} bytes)")
        if kind == b"IEND":
            return None
        pos = end


def _jpeg(data: bytes) -> None:
    n, i = len(data), 2
    while True:
        if i + 2 > n:
            raise _Cut(f"the JPEG ends before its EOI marker (cut at byte {n})")
        if data[i] != 0xFF:
            raise _Odd()
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            return None
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length
            i += 2
            continue
        if i + 4 > n:
            raise _Cut(f"the JPEG ends inside a marker segment (cut at byte {n})")
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if end > n:
            raise _Cut(f"the JPEG ends inside a marker segment ({n} of {end} bytes)")
        i = end
        if marker != 0xDA:  # not SOS
            continue
        while True:  # entropy-coded data: skip to the next real marker
            j = data.find(b"\xff", i)
            if j < 0 or j + 1 >= n:
                raise _Cut(f"the JPEG ends inside its compressed image data (cut at byte {n}, no EOI marker)")
            nxt = data[j + 1]
            if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                i = j + 2
                continue
            i = j
            break


def _read(f: BinaryIO, n: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) < n:
        raise _Cut(f"the DICOM file ends inside {what}")
    return b


def _dicom(f: BinaryIO, size: int) -> None:
    f.seek(DICOM_PREFIX_END)
    ts = None
    while True:  # file meta: explicit VR little endian, group 0002
        pos = f.tell()
        hdr = f.read(8)
        if len(hdr) < 8:
            raise _Cut("the DICOM file ends inside its file meta information")
        group = struct.unpack("<H", hdr[:2])[0]
        if group != 0x0002:
            f.seek(pos)
            break
        elem, vr = struct.unpack("<H", hdr[2:4])[0], hdr[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<I", _read(f, 4, "its file meta information"))[0]
        else:
            length = struct.unpack("<H", hdr[6:8])[0]
        if length == _UNDEFINED or f.tell() + length > size:
            raise _Cut("the DICOM file ends inside its file meta information")
        value = f.read(length)
        if elem == 0x0010:
            ts = value.rstrip(b"\0 ").decode("ascii", "replace")
    if ts is None:
        raise _Odd()
    if ts == "1.2.840.10008.1.2.1.99":  # deflated explicit VR little endian
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            while not d.eof and (chunk := f.read(1 << 20)):
                while chunk and not d.eof:  # bounded output: a deflate bomb costs time, not memory
                    out = d.decompress(chunk, 1 << 20)
                    if not out and d.unconsumed_tail == chunk:
                        raise _Odd()
                    chunk = d.unconsumed_tail
        except zlib.error as e:
            raise _Odd() from e
        if d.eof:
            return None
        raise _Cut("the DICOM file's deflated data set ends before its deflate stream does")
    implicit = ts == "1.2.840.10008.1.2"
    endian = ">" if ts == "1.2.840.10008.1.2.2" else "<"
    seen = _walk(f, size, implicit=implicit, endian=endian, depth=0)
    if _ROWS in seen and not seen & _PIXEL_TAGS:
        raise _Cut("the DICOM file ends before its Pixel Data")
    return None


def _bare_dicom(f: BinaryIO, size: int, *, implicit: bool) -> None:
    """A bare data set (no preamble, 'DICM' or file meta; little endian, as cxr.dicom reads it)."""
    f.seek(0)
    seen = _walk(f, size, implicit=implicit, endian="<", depth=0)
    if _ROWS in seen and not seen & _PIXEL_TAGS:
        raise _Cut("the DICOM data set ends before its Pixel Data")
    return None


def _walk(f: BinaryIO, size: int, *, implicit: bool, endian: str, depth: int) -> set[int]:
    """Walk data elements to the end of the file (depth 0) or to an Item Delimitation Item."""
    if depth > _MAX_DEPTH:
        raise _Odd()
    seen: set[int] = set()
    tag_fmt, len32, len16 = f"{endian}HH", f"{endian}I", f"{endian}H"
    while True:
        pos = f.tell()
        if depth == 0 and pos == size:
            return seen
        hdr = f.read(8)
        if len(hdr) < 8:
            raise _Cut("the DICOM file ends inside a data element header" if depth == 0
                       else "the DICOM file ends inside a sequence item")
        group, elem = struct.unpack(tag_fmt, hdr[:4])
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return seen
        if implicit or tag in (_ITEM, _SEQ_END):
            length = struct.unpack(len32, hdr[4:8])[0]
        else:
            vr = hdr[4:6]
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise _Odd()
            length = (struct.unpack(len32, _read(f, 4, "a data element header"))[0] if vr in _LONG_VRS
                      else struct.unpack(len16, hdr[6:8])[0])
        if depth == 0:
            seen.add(tag)
        if length == _UNDEFINED:
            _items(f, size, implicit=implicit, endian=endian, depth=depth + 1, tag=tag)
        else:
            end = f.tell() + length
            if end > size:
                raise _Cut(f"the DICOM file ends inside element ({group:04X},{elem:04X}): {size - f.tell()} of "
                           f"its {length} bytes are there")
            f.seek(end)
        if depth == 0 and tag in _PIXEL_TAGS:
            return seen  # the image is whole: what follows (padding, an odd trailing byte) is not needed


def _items(f: BinaryIO, size: int, *, implicit: bool, endian: str, depth: int, tag: int) -> None:
    """Follow the items of an undefined-length sequence or encapsulated Pixel Data (PS3.5 7.5, A.4)."""
    fmt = f"{endian}HHI"
    where = "its encapsulated Pixel Data" if tag in _PIXEL_TAGS else "a sequence"
    while True:
        group, elem, length = struct.unpack(fmt, _read(f, 8, f"{where} (no Sequence Delimitation Item)"))
        item = group << 16 | elem
        if item == _SEQ_END:
            return
        if item != _ITEM:
            raise _Odd()
        if length == _UNDEFINED:
            _walk(f, size, implicit=implicit, endian=endian, depth=depth)
        else:
            end = f.tell() + length
            if end > size:
                raise _Cut(f"the DICOM file ends inside {where}: an item of {length} bytes is cut short")
            f.seek(end)
