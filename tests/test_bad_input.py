"""Bad input gets a specific code and a sentence, and never an exception; good input of
every raster flavour decodes. Everything here goes through the worker's own Screener."""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest

from tests.badfiles import bad_files, jpeg_bytes, png_bomb, png_bytes
from tests.imagegen import chest_like
from worker.screening.decode import ImageDecodeError, decode, open_image
from worker.screening.model import load_bundle
from worker.screening.pipeline import Screener

BAD = bad_files()


@pytest.fixture(scope="module")
def screener(tiny_bundle) -> Screener:
    return Screener(load_bundle(tiny_bundle))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_gets_its_specific_code(name, screener):
    data, code = BAD[name]
    out = screener.screen(data)
    assert out.status == "rejected", (name, out.status, out.error)
    assert out.reject_code == code, (name, out.error)
    assert out.error.startswith(f"{code}: ") and len(out.error) > len(code) + 20  # a sentence, not just a code
    assert out.probabilities is None and out.predicted_class is None


def test_underlying_causes_are_named():
    names = ("truncated.dcm", "corrupt_j2k.dcm", "empty.png", "truncated.png", "report.dcm")
    msgs = {name: _error(BAD[name][0]) for name in names}
    assert "pixel data" in msgs["truncated.dcm"].lower()
    assert "J2K" in msgs["corrupt_j2k.dcm"] or "JPEG 2000" in msgs["corrupt_j2k.dcm"]
    assert "empty" in msgs["empty.png"]
    assert "truncated" in msgs["truncated.png"]
    assert "Basic Text SR" in msgs["report.dcm"]


def _error(data: bytes) -> str:
    with pytest.raises(ImageDecodeError) as e:
        decode(data)
    return e.value.message


def test_decompression_bomb_is_refused_before_allocating():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError) as e:
        open_image(png_bomb(60000))
    assert e.value.code == "too_large" and "60000x60000" in e.value.message.replace(" ", "")
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing near 3.6 GB
    # A JPEG whose SOF marker declares 60000x60000.
    jpeg = bytearray(jpeg_bytes(chest_like(64)))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    with pytest.raises(ImageDecodeError) as e:
        open_image(bytes(jpeg))
    assert e.value.code == "too_large"
    # Under PIL's own bomb limit but over ours: our limit (CXR_MAX_IMAGE_PIXELS) applies.
    with pytest.raises(ImageDecodeError) as e:
        open_image(png_bomb(5000), max_pixels=10_000_000)
    assert e.value.code == "too_large" and "CXR_MAX_IMAGE_PIXELS" in e.value.message


@pytest.mark.parametrize("mode, tol", [(None, 1 / 255), ("RGB", 1 / 255), ("P", 0.06), ("RGBA", 1 / 255), ("LA", 1 / 255)])
def test_png_flavours_decode_to_the_same_grey(mode, tol):
    arr = chest_like(300)
    out = decode(png_bytes(arr, mode))
    assert out.pixels.shape == (300, 300) and out.format == "png"
    assert np.abs(out.pixels - arr / 255).max() <= tol + 1e-6


def test_16bit_png_uses_its_full_range():
    out = decode(png_bytes(chest_like(300, bits=16)))
    assert out.metadata["mode"].startswith("I;16") and out.pixels.min() == 0 and out.pixels.max() == 1


@pytest.mark.parametrize("mode, tol", [(None, 0.03), ("RGB", 0.03), ("CMYK", 0.05)])
def test_jpeg_flavours_decode_to_the_same_grey(mode, tol):
    arr = chest_like(300)
    out = decode(jpeg_bytes(arr, mode))
    assert out.format == "jpeg" and out.pixels.shape == (300, 300)
    assert out.metadata["mode"] == (mode or "L")
    assert np.abs(out.pixels - arr / 255).mean() <= tol


def test_good_files_after_bad_ones_still_score(screener):
    for data, _ in BAD.values():
        screener.screen(data)
    out = screener.screen(png_bytes(chest_like(320)))
    assert out.status == "done" and abs(sum(out.probabilities.values()) - 1) < 1e-6
