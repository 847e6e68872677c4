"""DICOM test files written by the tests themselves, in every transfer syntax we can encode.

Encoders: pydicom itself (implicit/explicit/deflated/big endian, RLE), pylibjpeg-openjpeg
(JPEG 2000 through pydicom), pyjpegls (JPEG-LS through pydicom) and imagecodecs'
libjpeg-turbo (JPEG baseline, extended 12-bit, lossless and lossless SV1), encapsulated with
pydicom. A syntax whose encoder is missing is skipped with the package to install.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from tests.imagegen import chest_like

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
MF_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"

SECRET_PATIENT_ID = "PID-7f3a-SECRET-4411"
SECRET_PATIENT_NAME = "Zyxwvut^Secretname"


@dataclass(frozen=True)
class Syntax:
    key: str
    uid: str
    lossless: bool
    bits: int = 12  # the stored bit depth the encoder takes (JPEG baseline is 8-bit only)


SYNTAXES = {s.key: s for s in (
    Syntax("explicit", ExplicitVRLittleEndian, True),
    Syntax("implicit", ImplicitVRLittleEndian, True),
    Syntax("deflated", DeflatedExplicitVRLittleEndian, True),
    Syntax("big_endian", ExplicitVRBigEndian, True),
    Syntax("rle", RLELossless, True),
    Syntax("jpeg_ls", JPEGLSLossless, True),
    Syntax("jpeg_ls_near", JPEGLSNearLossless, False),
    Syntax("j2k", JPEG2000Lossless, True),
    Syntax("j2k_lossy", JPEG2000, False),
    Syntax("jpeg_lossless_sv1", JPEGLosslessSV1, True),
    Syntax("jpeg_lossless", JPEGLossless, True),
    Syntax("jpeg_extended", JPEGExtended12Bit, False),
    Syntax("jpeg_baseline", JPEGBaseline8Bit, False, bits=8),
)}


def chest_dataset(
    size: int = 320,
    *,
    seed: int = 0,
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    sop_class: str = CR_STORAGE,
    **tags,
) -> Dataset:
    """An uncompressed (explicit VR little endian) chest radiograph dataset.

    MONOCHROME1 stores the inverted pixels, so it shows the same picture as MONOCHROME2."""
    pixels = chest_like(size, seed=seed, bits=bits)
    top = (1 << bits) - 1
    if photometric == "MONOCHROME1":
        pixels = (top - pixels.astype(np.int32)).astype(pixels.dtype)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = f"ACC{seed:05d}"
    ds.PatientID = SECRET_PATIENT_ID
    ds.PatientName = SECRET_PATIENT_NAME
    ds.PatientAge = "054Y"
    ds.PatientSex = "F"
    ds.Manufacturer = "cxr-screen tests"
    ds.Modality = "DX" if sop_class == DX_STORAGE else "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    ds.WindowCenter = (top + 1) // 2
    ds.WindowWidth = top + 1
    ds.PixelData = pixels.tobytes()
    for k, v in tags.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def missing_encoder(key: str) -> str | None:
    """Why ``key`` cannot be encoded here (the package to install), or None."""
    s = SYNTAXES[key]
    if key.startswith("jpeg_") and not key.startswith("jpeg_ls"):
        try:
            import imagecodecs  # noqa: F401
        except ImportError:
            return "JPEG encoding needs imagecodecs (pip install imagecodecs)"
        return None
    if key in ("rle", "jpeg_ls", "jpeg_ls_near", "j2k", "j2k_lossy"):
        from pydicom.pixels import get_encoder

        enc = get_encoder(s.uid)
        if not enc.is_available:
            return f"{s.uid.name} encoding needs: {'; '.join(enc.missing_dependencies)}"
    return None


def encode(ds: Dataset, key: str) -> bytes:
    """``ds`` (uncompressed) written in transfer syntax ``key`` (see SYNTAXES), keeping its SOP
    Instance UID as a transcoding router does. ``ds`` is not changed."""
    s = SYNTAXES[key]
    ds = copy.deepcopy(ds)
    if key in ("explicit", "implicit", "deflated"):
        ds.file_meta.TransferSyntaxUID = s.uid
        return to_bytes(ds)
    if key == "big_endian":
        arr = np.frombuffer(ds.PixelData, dtype="<u2" if ds.BitsAllocated == 16 else np.uint8)
        ds.PixelData = arr.astype(">u2" if ds.BitsAllocated == 16 else np.uint8).tobytes()
        ds.file_meta.TransferSyntaxUID = s.uid
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True, little_endian=False, implicit_vr=False)
        return buf.getvalue()
    if key in ("rle", "jpeg_ls", "j2k"):
        ds.compress(s.uid, generate_instance_uid=False)
        return to_bytes(ds)
    if key == "jpeg_ls_near":
        ds.compress(s.uid, jls_error=2, generate_instance_uid=False)
        return to_bytes(ds)
    if key == "j2k_lossy":
        ds.compress(s.uid, j2k_psnr=[60], generate_instance_uid=False)
        return to_bytes(ds)
    # JPEG family through libjpeg-turbo (imagecodecs), then encapsulated.
    import imagecodecs

    arr = ds.pixel_array
    if key == "jpeg_baseline":
        if ds.BitsStored != 8:
            raise ValueError("JPEG baseline is 8-bit: build the dataset with bits=8")
        frame = imagecodecs.jpeg8_encode(arr, level=95)
    elif key == "jpeg_extended":
        frame = imagecodecs.jpeg8_encode(arr, level=95, bitspersample=12)
    elif key == "jpeg_lossless_sv1":
        frame = imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1, bitspersample=ds.BitsStored)
    elif key == "jpeg_lossless":
        frame = imagecodecs.jpeg8_encode(arr, lossless=True, predictor=6, bitspersample=ds.BitsStored)
    else:
        raise KeyError(key)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = s.uid
    return to_bytes(ds)


def multi_frame(frames: int, *, size: int = 320) -> bytes:
    """A Multi-frame Grayscale Word SC object with ``frames`` frames (1: a single frame wrapped)."""
    stack = np.stack([chest_like(size, seed=i, bits=12) for i in range(frames)])
    ds = chest_dataset(size, sop_class=MF_GRAYSCALE_WORD_SC)
    ds.NumberOfFrames = frames
    ds.PixelData = stack.astype(np.uint16).tobytes()
    return to_bytes(ds)


def structured_report() -> bytes:
    """A Basic Text SR: valid DICOM with no Pixel Data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = SECRET_PATIENT_ID
    ds.ValueType = "CONTAINER"
    return to_bytes(ds)


def corrupt_j2k(size: int = 320) -> bytes:
    """JPEG 2000 lossless whose codestream header (SIZ marker segment) is overwritten."""
    data = bytearray(encode(chest_dataset(size), "j2k"))
    soc = data.find(b"\xff\x4f\xff\x51")
    assert soc > 0, "no JPEG 2000 codestream found"
    data[soc + 4:soc + 44] = b"\xff" * 40
    return bytes(data)


def unsupported_syntax(size: int = 320) -> bytes:
    """A file that says it is MPEG2 video (a syntax no radiograph uses)."""
    ds = chest_dataset(size)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    return to_bytes(ds)
