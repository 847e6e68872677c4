"""DICOM as PACS and archives really hold it: bare data sets with no Part 10 header, a
preamble that starts with 'PK', bits above Bits Stored, pixel padding. Each against a
rendering computed here, independently of the decoder (numpy and PS3.3's formulas)."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess

import numpy as np
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from api.uploads import detect, is_zip
from cxr.dicom import bare_dicom_encoding, read_header
from cxr.formats import sniff
from tests.conftest import IN_CI
from tests.dicomgen import chest_dataset, missing_encoder, to_bytes
from tests.imagegen import chest_like
from tests.test_dicom_decode import need_encoder
from worker.screening.decode import decode, mask_to_bits_stored
from worker.screening.pipeline import gated_pixels

KEY = b"k" * 32
SIZE = 128


def bare(ds, *, implicit: bool, group_length: bool = False) -> bytes:
    """The data set alone: no preamble, no 'DICM', no file meta (little endian)."""
    ds = copy.deepcopy(ds)
    if group_length:  # ACR-NEMA style: each group opens with its (gggg,0000) length
        ds.add_new(0x00080000, "UL", 0)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def window_linear(values: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window to [0, 1], written out here."""
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    return np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1)


# No Part 10 header ---------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize("group_length", [False, True])
def test_a_bare_data_set_is_recognised_screened_and_noted(implicit, group_length):
    ds = chest_dataset(SIZE, seed=7)
    data = bare(ds, implicit=implicit, group_length=group_length)
    assert not data[128:132] == b"DICM"
    assert sniff(data[:256]) == "dicom" and detect(data[:256]) == "application/dicom"
    assert bare_dicom_encoding(data[:256]) == ("implicit" if implicit else "explicit")
    part10 = decode(to_bytes(ds))
    pixels, meta = gated_pixels(data)
    assert np.array_equal(pixels, part10.pixels)
    assert meta["transfer_syntax"] == (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    assert meta["notes"][0].startswith("dicom_no_meta: ")
    header = read_header(data, key=KEY)  # intake: identity by SOP Instance UID works too
    assert header is not None and header.sop_instance_uid == ds.SOPInstanceUID


def part10_without_syntax(ds, *, implicit: bool) -> bytes:
    """A Part 10 file (preamble, 'DICM', file meta) whose file meta lacks (0002,0010) Transfer
    Syntax UID, as some writers leave it out; the data set in implicit or explicit VR LE."""
    ds = copy.deepcopy(ds)
    del ds.file_meta.TransferSyntaxUID
    ds.preamble = b"\0" * 128
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] == b"DICM" and b"1.2.840.10008.1.2" not in data[132:400]
    return data


@pytest.mark.parametrize("implicit", [True, False])
def test_a_part10_file_without_a_transfer_syntax_is_screened_and_noted(implicit):
    ds = chest_dataset(SIZE, seed=8)
    data = part10_without_syntax(ds, implicit=implicit)
    pixels, meta = gated_pixels(data)
    assert np.array_equal(pixels, decode(to_bytes(ds)).pixels)
    assert meta["transfer_syntax"] == (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    assert meta["notes"][0].startswith("dicom_no_meta: ") and "Transfer Syntax UID" in meta["notes"][0]
    header = read_header(data, key=KEY)
    assert header is not None and header.sop_instance_uid == ds.SOPInstanceUID


def test_text_and_other_files_are_not_taken_for_bare_dicom():
    rng = np.random.default_rng(0)
    samples = [b"Patient notes: not an image at all\n" * 20, b"DICOM? no, just text pretending\n" * 20,
               b"\x08\x00 looks like a tag, then text follows here ........." * 4, b"{\"json\": true}" * 20,
               b"\x00" * 300, b"GIF89a" + b"\0" * 300, b"%PDF-1.7\n" + b"x" * 300]
    samples += [rng.integers(0, 256, 300, dtype=np.uint8).tobytes() for _ in range(200)]
    # random bytes behind a plausible first tag: the walk through the elements must refuse them
    samples += [b"\x08\x00\x05\x00" + rng.integers(0, 256, 296, dtype=np.uint8).tobytes() for _ in range(200)]
    for s in samples:
        assert sniff(s[:256]) is None, s[:16]
        assert read_header(s, key=KEY) is None


def test_a_part10_file_whose_preamble_starts_with_pk_is_dicom_not_a_zip():
    ds = chest_dataset(SIZE, seed=8)
    buf = io.BytesIO()
    ds.preamble = b"PK\x03\x04" + b"\x00" * 124
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    assert data[:4] == b"PK\x03\x04" and data[128:132] == b"DICM"
    assert not is_zip(data[:256]) and detect(data[:256]) == "application/dicom" and sniff(data) == "dicom"
    assert is_zip(b"PK\x03\x04" + b"\x00" * 200)  # a real zip is still a zip
    np.testing.assert_array_equal(decode(data).pixels, decode(to_bytes(chest_dataset(SIZE, seed=8))).pixels)


# Bits above Bits Stored ----------------------------------------------------------------

SYNTAX = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg_ls": JPEGLSLossless, "j2k": JPEG2000Lossless}


def high_bits_file(key: str) -> tuple[bytes, np.ndarray, float, float]:
    """A 12-bit film whose stored 16-bit words carry an overlay in bits 12-15 over a band and
    garbage over another, encoded so the codestream keeps them (encoded as 16 bits stored, then
    the header says 12). Returns (file, the 12-bit values, window center, width)."""
    ds = chest_dataset(SIZE, seed=11)
    clean = chest_like(SIZE, seed=11, bits=12).astype(np.uint16)
    dirty = clean.copy()
    dirty[20:40, :] |= 0xF000
    dirty[60:64, :] |= np.random.default_rng(1).integers(1, 16, (4, SIZE)).astype(np.uint16) << 12
    ds.PixelData = dirty.astype("<u2").tobytes()
    ds.BitsStored, ds.HighBit = 16, 15
    if key != "explicit":
        ds.compress(SYNTAX[key], generate_instance_uid=False)
    ds.BitsStored, ds.HighBit = 12, 11
    return to_bytes(ds), clean, float(ds.WindowCenter), float(ds.WindowWidth)


@pytest.mark.parametrize("key", list(SYNTAX))
def test_bits_above_bits_stored_are_masked_in_every_syntax(key):
    if key != "explicit" and missing_encoder(key) is not None:
        need_encoder(key)
    data, clean, c, w = high_bits_file(key)
    pixels = decode(data).pixels
    np.testing.assert_allclose(pixels, window_linear(clean, c, w), atol=1e-6)


@pytest.mark.parametrize("key, tool", [("explicit", "dcmj2pnm"), ("rle", "dcmj2pnm"), ("jpeg_ls", "dcml2pnm")])
def test_bits_above_bits_stored_match_dcmtk(key, tool, tmp_path):
    """DCMTK, an independent DICOM renderer, with the header's window and overlays off, gives
    the same picture to within one grey level of 255."""
    if shutil.which(tool) is None:
        if IN_CI:
            pytest.fail(f"CI=true installs DCMTK, but {tool} is missing")
        pytest.skip(f"{tool} not installed (apt-get install -y dcmtk)")
    if key != "explicit" and missing_encoder(key) is not None:
        need_encoder(key)
    from PIL import Image

    data, clean, c, w = high_bits_file(key)
    (tmp_path / "in.dcm").write_bytes(data)
    subprocess.run([tool, "+Wi", "1", "-O", str(tmp_path / "in.dcm"), str(tmp_path / "out.pgm")], check=True,
                   capture_output=True, timeout=60)
    dcmtk = np.asarray(Image.open(tmp_path / "out.pgm"), dtype=np.float64)
    ours = decode(data).pixels * 255.0
    assert np.abs(ours - dcmtk).max() <= 1.0
    unmasked = window_linear(clean | 0xF000, c, w) * 255.0  # what the overlay band would look like unmasked
    assert np.abs(unmasked[20:40] - dcmtk[20:40]).max() > 100


def test_signed_values_are_sign_extended_from_bits_stored():
    class Header(dict):
        def get(self, k, default=None):
            return super().get(k, default)

    rng = np.random.default_rng(2)
    values = rng.integers(-2048, 2048, (16, 16))  # 12-bit signed
    garbage = rng.integers(0, 16, (16, 16)) << 12
    stored = ((values & 0xFFF) | garbage).astype(np.uint16).view(np.int16)
    out = mask_to_bits_stored(stored, Header(BitsStored=12, PixelRepresentation=1))
    assert out.dtype == np.int16 and np.array_equal(out, values)
    unsigned = mask_to_bits_stored(stored.view(np.uint16), Header(BitsStored=12, PixelRepresentation=0))
    assert np.array_equal(unsigned, values & 0xFFF)


# Pixel padding -------------------------------------------------------------------------


def padded_cr(*, border: int = 40, pad_value: int = 4095, pad_fill=None, **tags) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A CR film inside a collimation border of padding. Returns (file, stored values, padding mask)."""
    values = chest_like(SIZE * 2, seed=12, bits=12).astype(np.int64) // 2 + 900  # the film: 900..2950
    pad = np.zeros(values.shape, bool)
    pad[:border], pad[-border:], pad[:, :border], pad[:, -border:] = True, True, True, True
    values[pad] = pad_value if pad_fill is None else pad_fill[pad]
    ds = chest_dataset(SIZE * 2, seed=12, PixelPaddingValue=pad_value, **tags)
    ds.PixelData = values.astype(np.uint16).tobytes()
    return to_bytes(ds), values, pad


def robust_rendering(values: np.ndarray, pad: np.ndarray, lo_pct=0.5, hi_pct=99.5) -> np.ndarray:
    lo, hi = np.percentile(values[~pad], [lo_pct, hi_pct])
    out = np.clip((values - lo) / (hi - lo), 0, 1)
    out[pad] = 0.0
    return out


def test_pixel_padding_is_left_out_of_the_fallback_range_and_shown_as_background():
    data, values, pad = padded_cr(WindowCenter=None, WindowWidth=None)
    pixels = decode(data).pixels
    np.testing.assert_allclose(pixels, robust_rendering(values, pad), atol=1e-5)
    assert pixels[pad].max() == 0.0 and pixels[~pad].max() == 1.0  # the film keeps its full contrast


def test_pixel_padding_range_limit_is_padding_too():
    fill = np.random.default_rng(3).integers(4000, 4096, (SIZE * 2, SIZE * 2))
    data, values, pad = padded_cr(pad_value=4095, pad_fill=fill, WindowCenter=None, WindowWidth=None,
                                  PixelPaddingRangeLimit=4000)
    np.testing.assert_allclose(decode(data).pixels, robust_rendering(values, pad), atol=1e-5)


def test_padding_does_not_count_as_clipped_by_the_window():
    # Padding over most of the image lies outside the window: the window is still sensible.
    data, values, pad = padded_cr(border=110, WindowCenter=1900, WindowWidth=2200)
    assert pad.mean() > 0.9
    expected = window_linear(values, 1900, 2200)
    expected[pad] = 0.0
    np.testing.assert_allclose(decode(data).pixels, expected, atol=1e-5)
