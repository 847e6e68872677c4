"""The decoded-memory budget (worker/screening/budget.py): studies are admitted by the bytes
their pixels decode to (from the header, before decoding), the bytes held at once never exceed
CXR_DECODE_BUDGET_MB, studies wait for budget instead of being refused, and a file whose
decoded bytes alone exceed the budget is rejected too_large without being decoded.

The files are generated here, just under the 80-megapixel limit: a deflated DICOM of a huge
uniform image is a few hundred KB (written as a stream, so the test never holds its pixels)."""

from __future__ import annotations

import io
import resource
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid

from cxr.settings import Settings
from tests.dicomgen import chest_dataset, to_bytes
from worker.screening.budget import DEFLATED, DecodeBudget, TooLargeForBudget, decoded_bytes

CR = "1.2.840.10008.5.1.4.1.1.1"
MB = 1024 * 1024


def deflated_dicom(rows: int, cols: int, *, samples: int = 1, bits: int = 8, frames: int = 1,
                   value: int = 0) -> bytes:
    """A Deflated Explicit VR Little Endian CR file of a uniform image, its pixel data
    compressed as a stream (never held whole)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DEFLATED
    ds = Dataset()
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    body = io.BytesIO()
    from pydicom.filebase import DicomFileLike

    fp = DicomFileLike(body)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    nbytes = rows * cols * samples * (bits // 8) * frames
    padded = nbytes + (nbytes % 2)
    # (7FE0,0010) OB/OW, 2 reserved bytes, 4-byte length (PS3.5 7.1.2).
    header = b"\xe0\x7f\x10\x00" + (b"OW" if bits > 8 else b"OB") + b"\x00\x00" + padded.to_bytes(4, "little")
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    mfp = DicomFileLike(out)
    mfp.is_little_endian, mfp.is_implicit_VR = True, False
    write_file_meta_info(mfp, meta, enforce_standard=True)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(z.compress(body.getvalue() + header))
    chunk = bytes([value]) * (4 * MB)
    left = padded
    while left:
        n = min(left, len(chunk))
        out.write(z.compress(chunk[:n]))
        left -= n
    out.write(z.flush())
    return out.getvalue()


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decoded_bytes_come_from_the_header_before_decoding():
    huge = deflated_dicom(8900, 8900, samples=3)  # 79.2 megapixels: under the 80 M pixel limit
    assert len(huge) < 1 * MB  # a 238 MB image in a few hundred KB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert decoded_bytes(huge) == 8900 * 8900 * 3
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 64 * 1024, grown_kb  # the header was read without inflating the 238 MB
    assert decoded_bytes(deflated_dicom(3000, 2000, bits=16)) == 3000 * 2000 * 2
    assert decoded_bytes(deflated_dicom(1000, 1000, frames=6)) == 6 * 1000 * 1000
    assert decoded_bytes(to_bytes(chest_dataset(320))) == 320 * 320 * 2  # explicit VR LE, 12 bits in 16
    assert decoded_bytes(png_bytes(np.zeros((300, 200, 3), np.uint8))) == 300 * 200 * 3
    assert decoded_bytes(png_bytes(np.zeros((300, 200), np.uint16))) == 300 * 200 * 2  # 16-bit grey
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((120, 80), np.uint8)).save(jpeg, format="JPEG")
    assert decoded_bytes(jpeg.getvalue()) == 120 * 80
    assert decoded_bytes(b"not an image") is None


def test_the_budget_admits_by_bytes_first_come_first_served():
    budget = DecodeBudget(100)
    admitted, release = threading.Event(), threading.Event()

    def big() -> None:
        with budget.hold(50):
            admitted.set()
            release.wait(5)

    with budget.hold(70):
        t = threading.Thread(target=big)
        t.start()
        assert not admitted.wait(0.3) and budget.in_flight == 70  # 70 + 50 > 100: it waits
    assert admitted.wait(2) and budget.in_flight == 50 and budget.peak == 70 and budget.waited == 1
    release.set()
    t.join(2)
    assert budget.in_flight == 0
    with pytest.raises(TooLargeForBudget) as e:
        with budget.hold(101):
            pass
    assert e.value.code == "too_large" and "CXR_DECODE_BUDGET_MB" in e.value.message


@pytest.fixture(scope="module")
def screener_factory(tiny_bundle):
    from worker.screening.model import load_bundle
    from worker.screening.pipeline import Screener
    from worker.service import screen_options

    loaded = load_bundle(tiny_bundle, device="cpu")

    def make(budget_mb: float, **overrides):
        # The deflated files here are uniform (they compress to almost nothing), which the gate
        # refuses as blank_image after decoding: the budget is what these tests are about.
        opts = dict(checkpoint=tiny_bundle, decode_budget_mb=budget_mb, engine="torch", max_batch=1,
                    gate_min_size=64, heatmaps="none", gate_blank_image=False)
        settings = Settings(**{**opts, **overrides})
        return Screener(loaded, screen_options(settings))

    return make


def test_studies_wait_for_budget_and_the_peak_never_exceeds_it(screener_factory):
    """12 threads screen 12 deflated 2000 x 2000 16-bit DICOMs (7.6 MB decoded each) under a
    budget of 20 MB: at most two are decoded at once, every one is screened, none refused."""
    files = [deflated_dicom(2000, 2000, bits=16, value=i) for i in range(12)]
    each = decoded_bytes(files[0])
    screener = screener_factory(20)
    assert screener.budget.total == 20 * MB and 2 * each <= 20 * MB < 3 * each
    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(screener.screen, files))
    assert [o.status for o in outcomes] == ["done"] * 12, [o.error for o in outcomes]
    assert screener.budget.peak <= screener.budget.total and screener.budget.peak == 2 * each
    assert screener.budget.waited > 0 and screener.budget.in_flight == 0


def test_one_file_over_the_whole_budget_is_too_large_and_not_decoded(screener_factory):
    huge = deflated_dicom(8900, 8900, samples=3)  # 238 MB decoded, under the pixel limit
    screener = screener_factory(200)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = screener.screen(huge)
    assert (outcome.status, outcome.reject_code) == ("rejected", "too_large")
    assert "CXR_DECODE_BUDGET_MB" in outcome.error and "227 MB" in outcome.error
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # never inflated
    assert screener.budget.peak == 0
    # Three at once, in threads, under a budget that fits one: one after the other, all screened.
    big = [deflated_dicom(4000, 4000, samples=3, value=v) for v in (10, 20, 30)]  # 46 MB decoded each
    screener = screener_factory(60)
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(screener.screen, big))
    assert [o.status for o in outcomes] == ["done"] * 3, [o.error for o in outcomes]
    assert screener.budget.peak == decoded_bytes(big[0]) <= screener.budget.total


@pytest.mark.parametrize("implicit", [True, False])
def test_a_bare_data_set_is_budgeted_like_any_dicom(implicit, screener_factory):
    """A bare data set (no preamble, 'DICM' or file meta) is screened like a Part 10 file, so its
    decoded bytes must count too (they were unknown, and the file went around the budget)."""
    from tests.test_dicom_readers import bare

    ds = chest_dataset(1024, seed=3)  # 12 bits in 16: 2 MB decoded
    data = bare(ds, implicit=implicit)
    assert decoded_bytes(data) == 1024 * 1024 * 2 == decoded_bytes(to_bytes(ds))
    outcome = screener_factory(1).screen(data)  # a 1 MB budget: more than the whole of it
    assert (outcome.status, outcome.reject_code) == ("rejected", "too_large"), outcome.error


def test_the_worker_and_predict_get_the_budget_from_the_settings():
    from worker.service import screen_options

    assert screen_options(Settings(decode_budget_mb=64)).decode_budget_bytes == 64 * MB
    assert Settings().decode_budget_mb == 512


@pytest.mark.parametrize("key", ["j2k", "jpeg_ls", "jpeg_lossless", "jpeg_extended"])
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(key, tmp_path):
    """Rows and Columns say 128 x 128, the compressed codestream 1024 x 1024: decoders allocate
    what the codestream says, so the budget (taken from the header) would not see it. The file
    is refused as inconsistent before any decoding, by the worker and by intake's pixel compare."""
    import tracemalloc

    import pydicom

    from cxr.identity import PixelsUnavailable, pixel_fingerprint
    from tests.dicomgen import encode, missing_encoder
    from worker.screening.pipeline import gated_pixels

    if (why := missing_encoder(key)) is not None:
        pytest.skip(why)
    ds = pydicom.dcmread(io.BytesIO(encode(chest_dataset(1024, seed=5), key)))
    ds.Rows = ds.Columns = 128
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    assert decoded_bytes(data) == 128 * 128 * 2
    tracemalloc.start()
    try:
        with pytest.raises(Exception) as e:
            gated_pixels(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert getattr(e.value, "code", None) == "unreadable" and "1024x1024" in str(e.value), e.value
    assert peak < 2 * len(data) + 4 * MB, peak  # nothing the size of the 1024 x 1024 image was made
    path = tmp_path / "f.dcm"
    path.write_bytes(data)
    with pytest.raises(PixelsUnavailable, match="1024x1024"):
        pixel_fingerprint(path, max_pixels=80_000_000)
    # The consistent file still decodes.
    assert gated_pixels(encode(chest_dataset(1024, seed=5), key))[0].shape == (1024, 1024)
