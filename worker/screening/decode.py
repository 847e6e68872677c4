"""Decode PNG, JPEG and DICOM bytes to a grey image in [0, 1] (0 = black).

Files are recognised by their content, never by their name. Decoding is two steps, so the
quality gate can look at the header before any pixel is decoded:

    opened = open_image(data)        # headers only; refuses bombs before allocating
    pixels = decode_pixels(opened)   # the (H, W) float32 image

Every failure raises :class:`ImageDecodeError` with a stable ``code`` (see
``worker.screening.gate.Code``) and a sentence saying what is wrong and what to do.

DICOM goes through pydicom 3 (with the pylibjpeg codecs or GDCM) in display order:
Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then VOI (the first
window, or a VOI LUT Sequence, falling back to a robust percentile range when the window is
absent or nonsensical), then MONOCHROME1 / Presentation LUT Shape INVERSE inversion.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr.dicom import anatomy_fields, codestream_mismatch, header_fields, read_dataset  # also sets pydicom's lenient reading
from cxr.formats import SNIFF_BYTES
from cxr.formats import sniff as _sniff
from worker.screening.gate import Code


class ImageDecodeError(ValueError):
    """A file that cannot be turned into a radiograph. ``code`` is stable; the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class VoiOptions:
    """How DICOM values become grey levels when the header gives no sensible window."""

    use_window: bool = True  # False: always the robust percentile range
    fallback_percentiles: tuple[float, float] = (0.5, 99.5)
    max_clipped_fraction: float = 0.9  # a window clipping more than this of the image is nonsensical


@dataclass
class Opened:
    """A file whose headers are parsed and whose pixels are not yet decoded."""

    format: str  # "png" | "jpeg" | "dicom"
    metadata: dict[str, Any]  # width, height, frames, and for DICOM the header fields
    handle: Any = field(repr=False)  # PIL image or pydicom Dataset


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # float32, (H, W), 0 = black, 1 = white
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)


def sniff(data: bytes) -> str | None:
    """The file type from its first bytes: 'png', 'jpeg', 'dicom' (Part 10 or a bare data set)
    or None. The one sniffer, :func:`cxr.formats.sniff`, shared with the API and intake."""
    return _sniff(data[:SNIFF_BYTES])


def open_image(data: bytes, *, max_pixels: int = 80_000_000) -> Opened:
    """Parse the headers. Raises ImageDecodeError (empty, not an image, too large, ...)."""
    if not data:
        raise ImageDecodeError(Code.unreadable, "the file is empty (0 bytes); send it again")
    kind = sniff(data)
    if kind in ("png", "jpeg"):
        opened = _open_raster(data, kind=kind, max_pixels=max_pixels)
    elif kind == "dicom":
        opened = _open_dicom(data, max_pixels=max_pixels)
    else:
        raise ImageDecodeError(
            Code.not_an_image,
            "not a PNG, JPEG or DICOM file (the content was checked; the file name is not trusted); "
            "send the radiograph itself as PNG, JPEG or DICOM",
        )
    opened.metadata["image_format"] = kind
    return opened


def decode_pixels(opened: Opened, *, voi: VoiOptions = VoiOptions(), frame: int = 0) -> np.ndarray:
    """The (H, W) float32 image in [0, 1]. Raises ImageDecodeError."""
    if opened.format == "dicom":
        return _dicom_pixels(opened.handle, voi=voi, frame=frame)
    return _raster_pixels(opened.handle, kind=opened.format, voi=voi)


def decode(data: bytes, *, max_pixels: int = 80_000_000, voi: VoiOptions = VoiOptions()) -> Decoded:
    """Open and decode in one step (no quality gate). Raises ImageDecodeError."""
    opened = open_image(data, max_pixels=max_pixels)
    pixels = decode_pixels(opened, voi=voi)
    return Decoded(pixels=pixels, format=opened.format, metadata=opened.metadata)


# Helpers ------------------------------------------------------------------------------


def to_unit_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map [lo, hi] to [0, 1], clipping outside."""
    if not hi > lo:
        return np.zeros(arr.shape, dtype=np.float32)
    out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def robust_range(arr: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
                 exclude: np.ndarray | None = None) -> tuple[float, float]:
    """The [low_pct, high_pct] percentile range; the full range if that is empty.

    ``exclude``: a boolean mask of ``arr``'s shape of pixels left out (pixel padding); when it
    leaves nothing, nothing is left out. Percentiles of a large image are taken on a regular
    subsample (every 4th pixel each way above 1 Mpx): the same values to within a grey level,
    at a fraction of the cost."""
    step = 4 if arr.ndim == 2 and arr.size > 1_000_000 else 1
    sample = arr[::step, ::step] if arr.ndim == 2 else arr
    full = arr
    if exclude is not None and not exclude.all():
        full = arr[~exclude]
        sample = sample[~(exclude[::step, ::step] if arr.ndim == 2 else exclude)]
        if sample.size == 0:
            sample = full
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    if not hi > lo:
        lo, hi = float(full.min()), float(full.max())
    return float(lo), float(hi)


def check_size(width: int, height: int, *, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            Code.too_large,
            f"the image declares {width}x{height} pixels, over the {max_pixels:,} pixel limit; refused before "
            "decoding (possible decompression bomb). Raise CXR_MAX_IMAGE_PIXELS if this is a real radiograph",
        )


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an (H, W, 3+) array, as PIL's convert('L') uses."""
    rgb = rgb.astype(np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# PNG / JPEG -----------------------------------------------------------------------------


def declared_size(data: bytes, kind: str) -> tuple[int, int] | None:
    """(width, height) as the PNG IHDR or JPEG SOF marker declares it, read from the bytes
    themselves so that a bomb is refused before any library looks at it. None if not found."""
    if kind == "png":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _open_raster(data: bytes, *, kind: str, max_pixels: int) -> Opened:
    if (size := declared_size(data, kind)) is not None:
        check_size(*size, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(
            Code.too_large,
            f"refused before decoding: {_cause(e)} Raise CXR_MAX_IMAGE_PIXELS if this is a real radiograph",
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(Code.unreadable, f"cannot read the {kind.upper()} header: {_cause(e)}") from e
    check_size(*img.size, max_pixels=max_pixels)
    return Opened(format=kind, metadata={"width": img.width, "height": img.height, "mode": img.mode, "frames": 1},
                  handle=img)


def _raster_pixels(img: Image.Image, *, kind: str, voi: VoiOptions = VoiOptions()) -> np.ndarray:
    try:
        img.load()
        if kind == "jpeg":
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(
            Code.unreadable, f"cannot decode the {kind.upper()} pixels ({_cause(e)}); the file is truncated or corrupt, "
            "send it again",
        ) from e
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) grey: no window in a PNG, so the robust range of the values, as for
        # a DICOM without one: a burned-in label or border at the top value (65535 over a
        # 12-bit film) must not squeeze the film into a few grey levels.
        arr = np.asarray(img, dtype=np.float32)
        return to_unit_range(arr, *robust_range(arr, *voi.fallback_percentiles))
    if mode != "L":
        # RGB, RGBA, LA, P (palette), CMYK, 1: to luminance. Alpha is ignored.
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


# DICOM --------------------------------------------------------------------------------


# Transfer syntaxes screened, and what to install to decode them.
_LJ = "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_JLS = "pip install pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)"
_J2K = "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
SUPPORTED_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "built in",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "built in",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99": "built in",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2": "built in",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50": _LJ,  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _LJ,  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57": _LJ,  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": _LJ,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _JLS,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _JLS,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _J2K,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _J2K,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pip install pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pip install pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pip install pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "built in (pip install pylibjpeg-rle is faster)",  # RLE Lossless
}


# Where two installed decoders differ a lot in speed, the faster (measured on 2048² 12-bit
# JPEG-LS: CharLS via pyjpegls about 125 ms, libjpeg via pylibjpeg about 510 ms).
PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",
    "1.2.840.10008.1.2.4.81": "pyjpegls",
}


def _syntax_name(ts: Any) -> str:
    name = getattr(ts, "name", "") or ""
    return f"{ts} ({name})" if name and name != str(ts) else str(ts)


def _sop_class_name(ds: Any) -> str:
    uid = ds.get("SOPClassUID")
    if uid is None and hasattr(ds, "file_meta"):
        uid = ds.file_meta.get("MediaStorageSOPClassUID")
    if uid is None:
        return ""
    return getattr(uid, "name", "") or str(uid)


def _open_dicom(data: bytes, *, max_pixels: int) -> Opened:
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on oddities; what matters is checked below
            ds, bare, inferred = read_dataset(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ImageDecodeError(
            Code.unreadable, f"cannot parse the DICOM file ({type(e).__name__}: {_cause(e)}); it is truncated or "
            "corrupt, send it again",
        ) from e
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not ts:
        raise ImageDecodeError(
            Code.unreadable, "the DICOM file meta has no Transfer Syntax UID; the file is truncated or was not "
            "written as DICOM Part 10, send it again",
        )
    if str(ts) not in SUPPORTED_SYNTAXES:
        raise ImageDecodeError(
            Code.unsupported_syntax,
            f"transfer syntax {_syntax_name(ts)} is not supported; have the sender (or a DICOM router) "
            "transcode it to Explicit VR Little Endian, JPEG Lossless, JPEG-LS, JPEG 2000 or RLE",
        )
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = _sop_class_name(ds)
        if sop and "Image" not in sop:
            raise ImageDecodeError(
                Code.not_an_image,
                f"the DICOM object has no Pixel Data: it is a {sop}, not an image; send the radiograph",
            )
        raise ImageDecodeError(
            Code.unreadable,
            f"the DICOM file ends before its Pixel Data{f' ({sop})' if sop else ''}; it is truncated or "
            "corrupt, send it again",
        )
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1:
        raise ImageDecodeError(Code.unreadable, f"the DICOM header gives no valid image size (Rows={rows!r}, "
                               f"Columns={cols!r}); the file is corrupt")
    check_size(cols, rows, max_pixels=max_pixels)
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as e:
        raise ImageDecodeError(Code.unreadable, "the DICOM Number of Frames is not a number; the file is corrupt") from e
    meta = header_fields(ds)
    meta.update(
        width=cols, height=rows, frames=frames,
        photometric=str(ds.get("PhotometricInterpretation", "") or "").upper(),
        anatomy=anatomy_fields(ds),
    )
    if bare:
        meta["notes"] = [f"dicom_no_meta: no DICOM Part 10 header (no preamble, 'DICM' or file meta); read as a "
                         f"bare data set in {_syntax_name(ds.file_meta.TransferSyntaxUID)}"]
    elif inferred:
        meta["notes"] = [f"dicom_no_meta: the DICOM file meta has no Transfer Syntax UID (0002,0010); read as "
                         f"{_syntax_name(ds.file_meta.TransferSyntaxUID)}, inferred from the data set's encoding"]
    return Opened(format="dicom", metadata=meta, handle=ds)


def _decoder_or_error(ts: Any) -> tuple[Any, ImageDecodeError | None]:
    """pydicom's decoder for ``ts``, or an error naming what to install when none is available here."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        decoder = None
    if decoder is not None and decoder.is_available:
        return decoder, None
    missing = "; ".join(decoder.missing_dependencies) if decoder is not None else ""
    return decoder, ImageDecodeError(
        Code.codec_missing,
        f"no decoder for transfer syntax {_syntax_name(ts)} is installed here; "
        f"{SUPPORTED_SYNTAXES.get(str(ts), 'pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg')}, "
        f"then restart the workers{f' (pydicom reports missing: {missing})' if missing else ''}",
    )


def _dicom_pixels(ds: Any, *, voi: VoiOptions, frame: int) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ts = ds.file_meta.TransferSyntaxUID
    decoder, err = _decoder_or_error(ts)
    if err is not None:
        raise err
    if (mismatch := codestream_mismatch(ds)) is not None:
        raise ImageDecodeError(Code.unreadable, mismatch)
    frames = int(ds.get("NumberOfFrames") or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
    options: dict[str, Any] = {"index": frame} if frames > 1 else {}
    if (plugin := PREFERRED_PLUGIN.get(str(ts))) and plugin in decoder.available_plugins:
        options["decoding_plugin"] = plugin
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if options:
                ds.pixel_array_options(**options)
            arr = ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, KeyError, TypeError, EOFError,
            OSError, IndexError) as e:
        cause = _cause(e)
        raise ImageDecodeError(
            Code.unreadable,
            f"cannot decode the DICOM pixel data ({_syntax_name(ts)}): {cause}. The file is truncated or its "
            "compressed data is corrupt; send it again",
        ) from e
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4) and frames == 1:
        arr = arr[0]  # a single frame wrapped as a stack

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        arr = mask_to_bits_stored(arr, ds)
    if photometric == "PALETTE COLOR":
        return _unit_from_any(luminance(apply_color_lut(arr, ds)))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # RGB / YBR (pydicom converts YBR to RGB): secondary captures and photos.
        return _unit_from_any(luminance(arr) if arr.ndim == 3 else arr)

    padding = padding_mask(arr, ds)
    values = apply_modality_lut(arr, ds).astype(np.float32, copy=False)
    pixels = apply_voi(values, ds, voi, exclude=padding)
    # MONOCHROME1 means "minimum is white". DX objects must then also say
    # PresentationLUTShape INVERSE: both describe the same single inversion.
    shape = str(ds.get("PresentationLUTShape", "") or "").upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        pixels = np.subtract(np.float32(1.0), pixels, out=pixels)
    if padding is not None:
        pixels[padding] = 0.0  # padding is not part of the image: shown as black background
    return pixels


def mask_to_bits_stored(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values with the bits above Bits Stored cleared (unsigned) or sign-extended from
    bit BitsStored-1 (Pixel Representation 1), as DICOM PS3.5 8.1.1 requires of a decoder.

    Native and RLE data come out of pydicom masked already; JPEG-LS and JPEG 2000 codestreams
    may carry unused high bits (overlays, burned-in graphics, garbage), which would otherwise
    reach the window. Shape and dtype are kept; non-integer arrays are returned as they are."""
    bits = ds.get("BitsStored")
    if arr.dtype.kind not in "iu" or not isinstance(bits, int) or not 0 < bits < arr.dtype.itemsize * 8:
        return arr
    mask = (1 << bits) - 1
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        sign = 1 << (bits - 1)
        wide = (arr.astype(np.int64) & mask) ^ sign
        return (wide - sign).astype(arr.dtype)
    if not (arr > mask).any():
        return arr
    return np.bitwise_and(arr, np.asarray(mask, dtype=arr.dtype))


def _int_value(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):  # an ambiguous US/SS value left undecoded
        return int.from_bytes(bytes(v[:2]), "little", signed=False) if len(v) >= 2 else None
    try:
        return int(first_value(v))
    except (TypeError, ValueError, IndexError):
        return None


def padding_mask(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """Pixels that are padding, not image: stored values equal to Pixel Padding Value
    (0028,0120), or between it and Pixel Padding Range Limit (0028,0121) inclusive (DICOM
    PS3.3 C.7.5.1.1.2). None when the header declares no padding or no pixel is padding.
    Shape: ``arr``'s (H, W) -> bool (H, W)."""
    value = _int_value(ds.get("PixelPaddingValue"))
    if value is None or arr.ndim != 2:
        return None
    limit = _int_value(ds.get("PixelPaddingRangeLimit"))
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:  # a signed value read as unsigned bytes
        bits = int(ds.get("BitsAllocated", 16) or 16)
        value = value - (1 << bits) if value >= 1 << (bits - 1) else value
        if limit is not None:
            limit = limit - (1 << bits) if limit >= 1 << (bits - 1) else limit
    lo, hi = (value, value) if limit is None else (min(value, limit), max(value, limit))
    mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() else None


def _cause(e: BaseException) -> str:
    """A library's error as one stable line: no memory addresses (the same file must give the
    same message in every process)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(e).split()))


def _unit_from_any(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    return to_unit_range(arr, float(arr.min()), float(arr.max()))


def first_value(v: Any) -> float:
    """The first of a possibly multi-valued DICOM number (Window Center/Width may hold several)."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
        return float(v)
    return float(v[0])


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray | None:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1], or None when the window is unusable."""
    if not (np.isfinite(center) and np.isfinite(width)):
        return None
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            return None
        return (1.0 / (1.0 + np.exp(-4.0 * (values - np.float32(center)) / np.float32(width)))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        return to_unit_range(values, center - width / 2, center + width / 2)
    if width <= 1:
        return None
    # LINEAR: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; linear in between.
    return to_unit_range(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)


def apply_voi(values: np.ndarray, ds: Any, voi: VoiOptions = VoiOptions(),
              exclude: np.ndarray | None = None) -> np.ndarray:
    """VOI transform of Modality-LUT output to [0, 1]: the first window, else the first VOI
    LUT, else (or when that is nonsensical) the robust percentile range.

    A window is nonsensical when its width is not positive, or when it leaves more than
    ``voi.max_clipped_fraction`` of the pixels clipped (stored values far outside it, as some
    16-bit DX writers do). ``exclude`` (bool, ``values``' shape): pixel padding, left out of
    the clipped fraction and of the percentile range.
    """
    if voi.use_window:
        out = _header_voi(values, ds)
        if out is not None:
            clipped_px = (out <= 0.0) | (out >= 1.0)
            if exclude is not None and not exclude.all():
                clipped_px = clipped_px[~exclude]
            if float(np.mean(clipped_px)) <= voi.max_clipped_fraction:
                return out
    return to_unit_range(values, *robust_range(values, *voi.fallback_percentiles, exclude=exclude))


def _header_voi(values: np.ndarray, ds: Any) -> np.ndarray | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        try:
            c, w = first_value(center), first_value(width)
        except (TypeError, ValueError, IndexError):
            c = w = float("nan")
        out = window(values, c, w, str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR"))
        if out is not None:
            return out
    seq = ds.get("VOILUTSequence")
    if seq:
        return _voi_lut(values, seq[0])
    return None


def _voi_lut(values: np.ndarray, item: Any) -> np.ndarray | None:
    """Apply one VOI LUT (PS3.3 C.11.2.1.1); its output range is that of its data."""
    try:
        n, first, _bits = (int(v) for v in item.LUTDescriptor)
        raw = item.LUTData
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    n = n or 65536  # 0 means 2**16 entries
    if isinstance(raw, bytes):
        lut = np.frombuffer(raw, dtype=np.uint8 if len(raw) == n else "<u2").astype(np.float32)
    else:
        lut = np.asarray(raw if hasattr(raw, "__len__") else [raw], dtype=np.float32)
    lut = lut[:n]
    if lut.size < 2 or not lut.max() > lut.min():
        return None
    idx = np.clip(np.rint(values) - first, 0, lut.size - 1).astype(np.intp)
    return to_unit_range(lut[idx], float(lut.min()), float(lut.max()))
