"""Decode PNG, JPEG and DICOM bytes to a grey image in [0, 1] (0 = black).

Files are recognised by their content, never by their name. Every failure raises
:class:`ImageDecodeError` with a stable ``code`` and a sentence saying what is wrong.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class ImageDecodeError(ValueError):
    """A file that cannot be turned into a radiograph. ``code`` is stable; the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # float32, (H, W), 0 = black, 1 = white
    format: str  # "png" | "jpeg" | "dicom"
    metadata: dict[str, Any] = field(default_factory=dict)


def sniff(data: bytes) -> str | None:
    """The file type from its first bytes: 'png', 'jpeg', 'dicom' or None."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def decode(data: bytes, *, max_pixels: int = 80_000_000) -> Decoded:
    """Decode any supported file. Raises ImageDecodeError."""
    if not data:
        raise ImageDecodeError("unreadable", "the file is empty (0 bytes)")
    kind = sniff(data)
    if kind in ("png", "jpeg"):
        return decode_raster(data, kind=kind, max_pixels=max_pixels)
    if kind == "dicom":
        return decode_dicom(data, max_pixels=max_pixels)
    raise ImageDecodeError(
        "not_an_image", "not a PNG, JPEG or DICOM file (content sniffed; the file name is not trusted)"
    )


def to_unit_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map [lo, hi] to [0, 1], clipping outside."""
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def robust_range(arr: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[float, float]:
    lo, hi = np.percentile(arr, [low_pct, high_pct])
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    return float(lo), float(hi)


def check_size(width: int, height: int, *, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            "unreadable",
            f"image declares {width}x{height} pixels, over the {max_pixels:,} pixel limit "
            "(possible decompression bomb; raise CXR_MAX_IMAGE_PIXELS if this is a real radiograph)",
        )


def decode_raster(data: bytes, *, kind: str, max_pixels: int) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            check_size(*img.size, max_pixels=max_pixels)
            img.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("unreadable", f"cannot decode {kind.upper()}: {e}") from e

    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        pixels = to_unit_range(arr, *robust_range(arr, 0.0, 100.0))
    else:
        if mode not in ("L",):
            # RGB, RGBA, LA, P (palette), CMYK, 1: convert to luminance.
            img = img.convert("L")
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    return Decoded(pixels=pixels, format=kind, metadata={"width": img.width, "height": img.height, "mode": mode})


DICOM_META_FIELDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "AccessionNumber",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PatientAge",
    "PatientSex",
    "Manufacturer",
    "PhotometricInterpretation",
)


def decode_dicom(data: bytes, *, max_pixels: int) -> Decoded:
    """DICOM in display order: Modality LUT, then VOI (window or LUT, robust fallback), then
    MONOCHROME1 / Presentation LUT inversion. Raw PatientID/PatientName are never returned."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise ImageDecodeError("unreadable", f"cannot parse DICOM: {e}") from e
    if "PixelData" not in ds:
        raise ImageDecodeError("not_an_image", f"DICOM object has no Pixel Data (SOP Class {ds.get('SOPClassUID', '?')})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError("multi_frame", f"DICOM has {frames} frames; only single-frame radiographs are screened")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    check_size(cols, rows, max_pixels=max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        ts = ds.file_meta.get("TransferSyntaxUID", "?")
        raise ImageDecodeError(
            "unreadable",
            f"no decoder for transfer syntax {ts} ({getattr(ts, 'name', '')}): {e}. "
            "Install pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle, or python-gdcm",
        ) from e
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError) as e:
        raise ImageDecodeError("unreadable", f"cannot decode DICOM pixel data: {e}") from e

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # Colour DICOM (secondary captures, photos): take luminance.
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[..., :3].mean(axis=-1)
        pixels = to_unit_range(arr, *robust_range(arr, 0.0, 100.0))
    else:
        values = apply_modality_lut(arr, ds).astype(np.float32)
        pixels = apply_voi(values, ds, apply_voi_lut)
        shape = str(ds.get("PresentationLUTShape", "")).upper()
        # MONOCHROME1 means "minimum is white". DX/CR objects must then also say
        # PresentationLUTShape INVERSE: both describe the same single inversion.
        if photometric == "MONOCHROME1" or shape == "INVERSE":
            pixels = 1.0 - pixels
    meta = {k: str(ds.get(k)) for k in DICOM_META_FIELDS if ds.get(k) not in (None, "")}
    meta.update(width=cols, height=rows, transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")))
    return Decoded(pixels=pixels.astype(np.float32), format="dicom", metadata=meta)


def apply_voi(values: np.ndarray, ds: Any, apply_voi_lut: Any) -> np.ndarray:
    """VOI transform to [0, 1]: the first window, or the VOI LUT, else a robust min-max.

    A window that leaves almost every pixel clipped (stored values far outside it) is
    treated as absent, and the robust 0.5-99.5 percentile range is used instead.
    """
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32)
        return to_unit_range(out, float(out.min()), float(out.max()))
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c, w = first_value(center), first_value(width)
        if w > 1:
            lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
            clipped = np.mean((values <= lo) | (values >= hi))
            if clipped < 0.9:
                return to_unit_range(values, lo, hi)
    return to_unit_range(values, *robust_range(values))


def first_value(v: Any) -> float:
    """The first of a possibly multi-valued DICOM number (Window Center/Width may hold several)."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
        return float(v)
    return float(v[0])
