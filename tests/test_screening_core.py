"""The screening core as plain functions: decode, preprocess, infer, explain, bundles."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.bundle import BundleError, read_meta
from worker.screening.decode import ImageDecodeError, decode, sniff
from worker.screening.model import load_bundle
from worker.screening.pipeline import Screener
from worker.screening.preprocess import preprocess
from tests.imagegen import chest_like, write_dicom, write_jpeg, write_png


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


def test_sniff_by_content_not_name(tmp_path):
    assert sniff(write_png(tmp_path / "a.dcm").read_bytes()) == "png"
    assert sniff(write_jpeg(tmp_path / "a.png").read_bytes()) == "jpeg"
    assert sniff(write_dicom(tmp_path / "a.jpg").read_bytes()) == "dicom"
    assert sniff(b"hello world") is None


@pytest.mark.parametrize("mode", [None, "RGB", "P", "RGBA"])
def test_png_modes_decode_to_the_same_grey(mode):
    arr = chest_like(128)
    out = decode(png_bytes(arr, mode))
    assert out.pixels.shape == (128, 128) and out.pixels.dtype == np.float32
    # Palette quantisation loses a little; everything else is exact to 8-bit rounding.
    tol = 0.06 if mode == "P" else 1 / 255 + 1e-6
    assert np.abs(out.pixels - arr / 255).max() <= tol


def test_16bit_png_uses_full_range():
    arr = chest_like(128, bits=12)
    out = decode(png_bytes(arr))
    assert out.pixels.min() == 0 and out.pixels.max() == 1


def test_dicom_monochrome1_matches_monochrome2_twin(tmp_path):
    m2 = decode(write_dicom(tmp_path / "m2.dcm", seed=5).read_bytes())
    m1 = decode(write_dicom(tmp_path / "m1.dcm", seed=5, photometric="MONOCHROME1").read_bytes())
    assert m2.format == "dicom" and m2.metadata["modality"] == "CR"
    assert not any("patient_id" in k.lower() or "name" in k.lower() for k in m2.metadata)
    np.testing.assert_allclose(m1.pixels, m2.pixels, atol=1e-6)


@pytest.mark.parametrize(
    "data, code",
    [(b"", "unreadable"), (b"just some text", "not_an_image"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "unreadable")],
)
def test_bad_bytes_raise_coded_errors(data, code):
    with pytest.raises(ImageDecodeError) as e:
        decode(data)
    assert e.value.code == code and e.value.message


def test_oversized_image_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match="pixel limit"):
        decode(png_bytes(chest_like(200)), max_pixels=10_000)


def test_preprocess_shape_and_normalisation():
    x = preprocess(np.full((300, 200), 0.75, np.float32), input_size=64, in_chans=3, mean=[0.5] * 3, std=[0.5] * 3)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x, 0.5, atol=1e-5)


def test_bundle_roundtrip_and_metadata_without_torch(tiny_bundle):
    meta = read_meta(tiny_bundle)
    assert meta.architecture == "efficientnet_b0" and meta.classes == ["Normal", "Pneumonia", "Tuberculosis"]
    loaded = load_bundle(tiny_bundle)
    assert loaded.meta == meta and len(loaded.sha256) == 64


def test_read_meta_rejects_non_bundles(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}   ")
    with pytest.raises(BundleError):
        read_meta(p)
    with pytest.raises(BundleError, match="not found"):
        read_meta(tmp_path / "missing.safetensors")


def test_screener_scores_and_writes_heatmap(tmp_path, tiny_bundle):
    screener = Screener(load_bundle(tiny_bundle))
    out = screener.screen(write_png(tmp_path / "a.png").read_bytes(), heatmap_to=tmp_path / "h.jpg")
    assert out.status == "done" and out.error is None
    assert abs(sum(out.probabilities.values()) - 1) < 1e-6
    overlay = Image.open(out.heatmap_path)
    assert overlay.format == "JPEG" and overlay.mode == "RGB" and max(overlay.size) <= 512
    bare = Image.open(tmp_path / "h.cam.png")  # the map alone, at the model's input size
    assert bare.format == "PNG" and bare.mode == "RGB" and bare.size == (screener.meta.input_size,) * 2
    again = screener.screen(write_png(tmp_path / "b.png").read_bytes())
    assert again.heatmap_path is None
    bad = screener.screen(b"\x00" * 100)
    assert bad.status == "rejected" and bad.reject_code == "not_an_image" and bad.error.startswith("not_an_image")
