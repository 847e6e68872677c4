"""DICOM decoding: every transfer syntax we can encode, real RG1 chest files from the PyPI
package pydicom-data, display-order rules (Modality LUT, VOI, MONOCHROME1), metadata."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cxr.dicom import pseudonymise, read_header
from tests.conftest import IN_CI
from tests.dicomgen import (
    SECRET_PATIENT_ID,
    SECRET_PATIENT_NAME,
    SYNTAXES,
    chest_dataset,
    encode,
    missing_encoder,
    multi_frame,
    to_bytes,
)
from tests.stack import ROOT, clean_env
from worker.screening.decode import ImageDecodeError, VoiOptions, decode, open_image
from worker.screening.model import load_bundle
from worker.screening.pipeline import Screener, model_input

LOSSLESS = [k for k, s in SYNTAXES.items() if s.lossless]
LOSSY = [k for k, s in SYNTAXES.items() if not s.lossless]


@pytest.fixture(scope="module")
def screener(tiny_bundle) -> Screener:
    return Screener(load_bundle(tiny_bundle))


def need_encoder(key: str) -> None:
    """Skip where an optional encoder is not installed; under CI=true (which installs them all) fail."""
    if (why := missing_encoder(key)) is not None:
        if IN_CI:
            pytest.fail(f"CI=true installs every encoder, but: {why}")
        pytest.skip(why)


def encoded(key: str, **kw) -> bytes:
    need_encoder(key)
    return encode(chest_dataset(bits=SYNTAXES[key].bits, **kw), key)


@pytest.mark.parametrize("key", LOSSLESS)
def test_lossless_syntaxes_decode_to_identical_pixels(key):
    reference = decode(to_bytes(chest_dataset(seed=3))).pixels
    out = decode(encoded(key, seed=3))
    assert out.metadata["transfer_syntax"] == SYNTAXES[key].uid
    assert np.array_equal(out.pixels, reference), f"{key} differs from uncompressed"


@pytest.mark.parametrize("key", LOSSY)
def test_lossy_syntaxes_give_probabilities_within_002(key, screener):
    bits = SYNTAXES[key].bits
    reference = screener.screen(to_bytes(chest_dataset(seed=4, bits=bits)))
    out = screener.screen(encoded(key, seed=4))
    assert reference.status == out.status == "done", out.error
    assert not np.array_equal(decode(encoded(key, seed=4)).pixels, decode(to_bytes(chest_dataset(seed=4, bits=bits))).pixels)
    for c, p in reference.probabilities.items():
        assert abs(out.probabilities[c] - p) <= 0.02, (key, c, p, out.probabilities[c])


def test_uncompressed_j2k_lossless_and_rle_are_the_same_radiograph(screener):
    """The key invariant, end to end: identical pixels, identical model input, identical scores."""
    for key in ("j2k", "rle"):
        need_encoder(key)
    ds = chest_dataset(seed=9)
    files = {"explicit": to_bytes(ds), "j2k": encode(ds, "j2k"), "rle": encode(ds, "rle")}
    assert len({len(b) for b in files.values()}) == 3  # really three different encodings
    pixels = {k: decode(b).pixels for k, b in files.items()}
    assert np.array_equal(pixels["explicit"], pixels["j2k"]) and np.array_equal(pixels["explicit"], pixels["rle"])
    scores = {k: screener.screen(b).probabilities for k, b in files.items()}
    assert scores["explicit"] == scores["j2k"] == scores["rle"]


# Real files: pydicom-data's RG1 (Philips CR chest PA, MONOCHROME1, 15-bit) -------------


def rg1(name: str) -> bytes:
    path = get_testdata_file(name)  # shipped in the pydicom-data wheel, found locally
    assert path is not None, f"{name} not found: pip install pydicom-data"
    return Path(path).read_bytes()


def test_rg1_real_chest_in_several_syntaxes(screener):
    unc = decode(rg1("RG1_UNCR.dcm"))  # explicit VR little endian
    j2kr = decode(rg1("RG1_J2KR.dcm"))  # JPEG 2000 lossless
    assert unc.metadata["photometric"] == "MONOCHROME1" and unc.metadata["body_part"] == "CHEST"
    assert unc.metadata["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert j2kr.metadata["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    assert unc.pixels.shape == (1955, 1841)
    assert np.array_equal(unc.pixels, j2kr.pixels)
    # RG1_UNCI is the lossy RG1_J2KI decompressed by the reference codec: ours agrees with it.
    j2ki, unci = decode(rg1("RG1_J2KI.dcm")), decode(rg1("RG1_UNCI.dcm"))
    assert j2ki.metadata["transfer_syntax"] == "1.2.840.10008.1.2.4.91"
    assert np.abs(j2ki.pixels - unci.pixels).max() < 0.01
    # MONOCHROME1 was inverted: the mediastinum and spine (dense) are brighter than the lung fields.
    h, w = unc.pixels.shape
    mediastinum = unc.pixels[int(0.3 * h):int(0.6 * h), int(0.46 * w):int(0.54 * w)].mean()
    lungs = np.mean([unc.pixels[int(0.35 * h):int(0.55 * h), int(a * w):int(b * w)].mean()
                     for a, b in ((0.22, 0.32), (0.68, 0.78))])
    assert mediastinum > lungs + 0.1, (mediastinum, lungs)
    # JPEG 2000 lossy (irreversible): scores agree within 0.02.
    lossy = screener.screen(rg1("RG1_J2KI.dcm"))
    exact = screener.screen(rg1("RG1_UNCR.dcm"))
    assert lossy.status == exact.status == "done"
    assert max(abs(lossy.probabilities[c] - p) for c, p in exact.probabilities.items()) <= 0.02


# Display order ------------------------------------------------------------------------


def model_x(data: bytes, tiny_meta) -> np.ndarray:
    return model_input(data, tiny_meta)[1]


@pytest.fixture(scope="module")
def tiny_meta(tiny_bundle):
    from cxr.bundle import read_meta

    return read_meta(tiny_bundle)


def test_monochrome1_twin_gives_the_same_model_input(tiny_meta):
    m2 = to_bytes(chest_dataset(seed=5))
    m1 = to_bytes(chest_dataset(seed=5, photometric="MONOCHROME1"))  # pixels inverted, tag changed
    m1_inverse = to_bytes(chest_dataset(seed=5, photometric="MONOCHROME1", PresentationLUTShape="INVERSE"))
    x2 = model_x(m2, tiny_meta)
    np.testing.assert_allclose(model_x(m1, tiny_meta), x2, atol=1e-5)
    # MONOCHROME1 + INVERSE is one inversion (DX writes both), not two.
    np.testing.assert_allclose(model_x(m1_inverse, tiny_meta), x2, atol=1e-5)
    assert not np.allclose(decode(m2).pixels, 1 - decode(m2).pixels, atol=0.1)


def test_presentation_lut_inverse_on_monochrome2_inverts():
    plain = decode(to_bytes(chest_dataset(seed=6))).pixels
    inverse = decode(to_bytes(chest_dataset(seed=6, PresentationLUTShape="INVERSE"))).pixels
    np.testing.assert_allclose(inverse, 1 - plain, atol=1e-6)


def test_rescale_slope_intercept_is_applied_before_the_window():
    ds = chest_dataset(seed=7)
    ref = decode(to_bytes(ds)).pixels
    # The same picture stored as (value + 1000) // 2, with slope 2 and intercept -1000.
    stored = np.frombuffer(ds.PixelData, dtype="<u2").astype(np.int32)
    rescaled = chest_dataset(seed=7, RescaleSlope=2, RescaleIntercept=-1000)
    rescaled.PixelData = ((stored + 1000) // 2).astype("<u2").tobytes()
    out = decode(to_bytes(rescaled)).pixels
    assert np.abs(out - ref).max() <= 1.5 / 4095  # only the halving's rounding differs
    ignored = decode(to_bytes(chest_dataset(seed=7, RescaleSlope=2, RescaleIntercept=-1000))).pixels
    assert np.abs(ignored - ref).max() > 0.1  # and the rescale really matters


def test_modality_lut_sequence_is_applied():
    ds = chest_dataset(seed=8)
    ref = decode(to_bytes(ds)).pixels
    lut_ds = chest_dataset(seed=8)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", [4095 - v for v in range(4096)])  # an inverting modality LUT...
    lut_ds.ModalityLUTSequence = Sequence([item])
    del lut_ds.RescaleSlope, lut_ds.RescaleIntercept
    out = decode(to_bytes(lut_ds)).pixels
    np.testing.assert_allclose(out, 1 - ref, atol=1.5 / 4095)  # ...so the picture comes out inverted


def test_voi_lut_sequence_matches_the_equivalent_window():
    windowed = decode(to_bytes(chest_dataset(seed=10, WindowCenter=1500, WindowWidth=2000))).pixels
    ds = chest_dataset(seed=10, WindowCenter=None, WindowWidth=None)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 12])
    x = np.arange(4096)  # window 1500/2000 maps 500..2499 linearly onto the output range
    item.add_new("LUTData", "US", np.clip(np.round((x - 500) / 1999 * 4095), 0, 4095).astype(int).tolist())
    ds.VOILUTSequence = Sequence([item])
    via_lut = decode(to_bytes(ds)).pixels
    np.testing.assert_allclose(via_lut, windowed, atol=2 / 4095 + 1e-4)


def test_missing_or_nonsensical_window_falls_back_to_robust_range():
    no_window = decode(to_bytes(chest_dataset(seed=11, WindowCenter=None, WindowWidth=None))).pixels
    assert no_window.min() == 0 and no_window.max() == 1  # the 0.5-99.5 percentiles span the picture
    # Stored values far outside the header window (some 16-bit DX writers): ignored.
    far = decode(to_bytes(chest_dataset(seed=11, WindowCenter=60000, WindowWidth=100))).pixels
    zero_width = decode(to_bytes(chest_dataset(seed=11, WindowCenter=2048, WindowWidth=0))).pixels
    np.testing.assert_array_equal(far, no_window)
    np.testing.assert_array_equal(zero_width, no_window)
    # A sensible window is used as given (this one is narrower than the data).
    narrow = decode(to_bytes(chest_dataset(seed=11, WindowCenter=2048, WindowWidth=1024))).pixels
    assert not np.array_equal(narrow, no_window) and (narrow == 1).mean() > 0.05


def test_fallback_percentiles_and_window_use_are_configurable():
    data = to_bytes(chest_dataset(seed=12))
    default = decode(data).pixels
    robust = decode(data, voi=VoiOptions(use_window=False)).pixels
    wide = decode(data, voi=VoiOptions(use_window=False, fallback_percentiles=(0.0, 100.0))).pixels
    assert not np.array_equal(default, robust) and not np.array_equal(robust, wide)
    assert (robust == 0).mean() >= 0.003 and (wide == 0).mean() < 0.001


def test_single_frame_wrapped_as_multi_frame_decodes_multi_frame_is_flagged():
    one = open_image(multi_frame(1))
    assert one.metadata["frames"] == 1
    assert decode(multi_frame(1)).pixels.shape == (320, 320)
    two = decode(multi_frame(2))  # no gate here: decode alone reads the first frame
    assert two.metadata["frames"] == 2 and two.pixels.shape == (320, 320)


def test_metadata_and_pseudonymised_patient_key_never_raw_identifiers():
    data = to_bytes(chest_dataset(seed=13))
    meta = decode(data).metadata
    for field in ("sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        assert meta[field].startswith("1.2.")
    assert (meta["accession_number"], meta["modality"], meta["body_part"], meta["view_position"]) == \
        ("ACC00013", "CR", "CHEST", "PA")
    assert (meta["patient_age"], meta["patient_sex"], meta["manufacturer"]) == ("054Y", "F", "cxr-screen tests")
    assert (meta["width"], meta["height"]) == (320, 320)
    header = read_header(data, key=b"k" * 32)
    assert header.fields["sop_instance_uid"] == meta["sop_instance_uid"]
    assert header.patient_key == pseudonymise(SECRET_PATIENT_ID, b"k" * 32) != pseudonymise(SECRET_PATIENT_ID, b"j" * 32)
    assert len(header.patient_key) == 64
    flat = repr(meta) + repr(header)
    assert SECRET_PATIENT_ID not in flat and "Secretname" not in flat


def test_identifiers_never_reach_warnings_or_logs(caplog, recwarn):
    # Values that break their VR's rules: pydicom's validation would quote them in a warning.
    ds = chest_dataset(seed=14)
    ds.PatientID = SECRET_PATIENT_ID + "\\\x07" + "x" * 80
    ds.PatientName = SECRET_PATIENT_NAME + "^" * 9 + "\x01"
    data = to_bytes(ds)
    caplog.clear()
    recwarn.clear()
    caplog.set_level("DEBUG")
    decode(data)
    read_header(data, key=b"k" * 32)
    said = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "SECRET" not in said and "Secretname" not in said


def test_a_missing_codec_names_the_package_to_install(tmp_path):
    need_encoder("jpeg_ls")
    path = tmp_path / "jls.dcm"
    path.write_bytes(encoded("jpeg_ls"))
    # A Python where pylibjpeg, pyjpegls and GDCM are not installed (import blocked).
    code = (
        "import sys\n"
        "for m in ('pylibjpeg', 'jpeg_ls', 'gdcm'): sys.modules[m] = None\n"
        "from worker.screening.decode import decode, ImageDecodeError\n"
        f"try:\n    decode(open({str(path)!r}, 'rb').read())\nexcept ImageDecodeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("codec_missing:"), out.stdout
    assert "JPEG-LS" in out.stdout and "pip install pylibjpeg pylibjpeg-libjpeg" in out.stdout


def test_unknown_syntax_is_refused_with_its_name():
    from tests.dicomgen import unsupported_syntax

    with pytest.raises(ImageDecodeError) as e:
        decode(unsupported_syntax())
    assert e.value.code == "unsupported_syntax" and "MPEG2" in e.value.message
