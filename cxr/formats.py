"""The one sniffer: what kind of file the first bytes say this is. Torch-free and cheap.

Used by the API (415 for anything else), by intake (which files get their DICOM header
read) and by the worker's decoder, so all three agree on what a PNG, a JPEG or a DICOM file is.
"""

from __future__ import annotations

from cxr.dicom import SNIFF_BYTES, bare_dicom_encoding, is_dicom

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}

__all__ = ["JPEG_MAGIC", "MEDIA_TYPES", "PNG_MAGIC", "SNIFF_BYTES", "sniff"]


def sniff(head: bytes) -> str | None:
    """'png', 'jpeg', 'dicom' or None, from the first :data:`SNIFF_BYTES` bytes (or fewer).

    ``DICM`` at offset 128 is checked first: a Part 10 preamble may hold anything, 'PK' or a
    PNG signature included (PS3.10 7.1). A bare little endian data set with no preamble and no
    file meta is DICOM too (see :func:`cxr.dicom.bare_dicom_encoding`)."""
    if is_dicom(head):
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if bare_dicom_encoding(head[:SNIFF_BYTES]) is not None:
        return "dicom"
    return None
