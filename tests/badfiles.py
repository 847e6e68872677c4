"""Bad input the tests write themselves, each with the code it must end with."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from tests.dicomgen import chest_dataset, corrupt_j2k, encode, multi_frame, structured_report, to_bytes, unsupported_syntax
from tests.imagegen import chest_like


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 60000) -> bytes:
    """A valid PNG whose header declares side x side 8-bit grey pixels (3.6 GB at 60000)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + png_chunk(b"IEND", b""))


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def bad_files() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, the reject code it must get). Names lie about content on purpose."""
    png, jpeg = png_bytes(chest_like(320)), jpeg_bytes(chest_like(320))
    dcm = to_bytes(chest_dataset(320, seed=21))
    return {
        "empty.png": (b"", "unreadable"),
        "truncated.png": (half(png), "unreadable"),
        "truncated.jpg": (half(jpeg), "unreadable"),
        "truncated.dcm": (half(dcm), "unreadable"),
        "notes.png": (b"Patient notes: not an image at all\n" * 20, "not_an_image"),
        "notes.dcm": (b"DICOM? no, just text pretending\n" * 20, "not_an_image"),
        "bomb.png": (png_bomb(60000), "too_large"),
        "report.dcm": (structured_report(), "not_an_image"),
        "corrupt_j2k.dcm": (corrupt_j2k(320), "unreadable"),
        "mpeg.dcm": (unsupported_syntax(320), "unsupported_syntax"),
        "one_pixel.png": (png_bytes(np.zeros((1, 1), np.uint8)), "too_small"),
        "lateral.dcm": (to_bytes(chest_dataset(320, seed=22, ViewPosition="LL")), "lateral_view"),
        "ct.dcm": (to_bytes(chest_dataset(320, seed=23, Modality="CT")), "not_radiograph"),
        "hand.dcm": (to_bytes(chest_dataset(320, seed=24, BodyPartExamined="HAND")), "not_chest"),
        "cine.dcm": (multi_frame(2, size=320), "multi_frame"),
        "black.png": (png_bytes(np.zeros((320, 320), np.uint8)), "blank_image"),
        "zero_dx.dcm": (to_bytes(chest_dataset(320, seed=25, PixelData=np.zeros((320, 320), np.uint16).tobytes())),
                        "blank_image"),
        "knee_no_body_part.dcm": (to_bytes(chest_dataset(320, seed=26, BodyPartExamined=None,
                                                         StudyDescription="XR KNEE 2 VIEWS")), "not_chest"),
    }


def good_dicoms() -> dict[str, bytes]:
    """Good chest DICOMs in a few syntaxes (all encoders used here are test dependencies)."""
    return {
        "good_explicit.dcm": to_bytes(chest_dataset(320, seed=31)),
        "good_j2k.dcm": encode(chest_dataset(320, seed=32), "j2k"),
        "good_rle.dcm": encode(chest_dataset(320, seed=33), "rle"),
        "good_mono1.dcm": to_bytes(chest_dataset(320, seed=34, photometric="MONOCHROME1")),
    }
