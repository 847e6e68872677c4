"""Radiograph-like test images, generated (no ../shared needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def chest_like(size: int = 320, *, seed: int = 0, bits: int = 8) -> np.ndarray:
    """A smooth synthetic 'chest': bright mediastinum and two darker lung fields plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.55 + 0.25 * np.exp(-((xx - 0.5) ** 2) / 0.01)
    for cx in (0.3, 0.7):
        img -= 0.3 * np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    img += 0.05 * rng.standard_normal((size, size))
    img = np.clip(img, 0, 1)
    top = (1 << bits) - 1
    return (img * top).round().astype(np.uint8 if bits <= 8 else np.uint16)


def write_png(path: Path, *, size: int = 320, seed: int = 0) -> Path:
    Image.fromarray(chest_like(size, seed=seed)).save(path, format="PNG")
    return path


def write_jpeg(path: Path, *, size: int = 320, seed: int = 0) -> Path:
    Image.fromarray(chest_like(size, seed=seed)).save(path, format="JPEG", quality=90)
    return path


def write_dicom(path: Path, *, size: int = 320, seed: int = 0, photometric: str = "MONOCHROME2") -> Path:
    """An uncompressed 12-bit CR chest DICOM written with pydicom."""
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = chest_like(size, seed=seed, bits=12)
    if photometric == "MONOCHROME1":
        pixels = (4095 - pixels).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"TEST{seed:04d}"
    ds.PatientName = "Test^Patient"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
