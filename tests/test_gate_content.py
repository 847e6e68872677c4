"""The gate's look at the picture itself: blank images, negatives (PNG/JPEG polarity), the
content-check hook, DICOM anatomy named outside BodyPartExamined, the minimum size derived
from the bundle. Every file here is generated, or a real chest from the pydicom-data wheel."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests.badfiles import jpeg_bytes, png_bytes
from tests.dicomgen import DX_STORAGE, chest_dataset, to_bytes
from tests.imagegen import chest_like
from worker.screening.content import detail, polarity_score
from worker.screening.decode import decode
from worker.screening.gate import (
    ANATOMY_FIELDS,
    MIN_DETAIL,
    POLARITY_THRESHOLD,
    Code,
    GateRules,
    Rejection,
    check_anatomy,
    min_size_for,
)
from worker.screening.model import load_bundle
from worker.screening.pipeline import Rejected, ScreenOptions, Screener, gated_pixels


@pytest.fixture(scope="module")
def screener(tiny_bundle) -> Screener:
    return Screener(load_bundle(tiny_bundle))


def png16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def rg1_pixels() -> np.ndarray:
    """The real RG1 chest (pydicom-data), decoded to a positive [0, 1] image, 512 px."""
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "pip install pydicom-data"
    pixels = decode(Path(path).read_bytes()).pixels
    return np.asarray(Image.fromarray(pixels).resize((512, 544), Image.Resampling.BOX))


def to8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


# Blank images --------------------------------------------------------------------------

SIZE = 320


def _label_on_black() -> np.ndarray:
    img = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(img).text((12, 10), "R  PA 2026-01-01", fill=255)
    return np.asarray(img)


def blank_kinds() -> dict[str, np.ndarray]:
    """(H, W) float images in [0, 1] with no radiograph in them."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    return {
        "black": np.zeros((SIZE, SIZE)),
        "white": np.ones((SIZE, SIZE)),
        "grey": np.full((SIZE, SIZE), 0.5),
        "grey+noise": 0.45 + 0.01 * rng.standard_normal((SIZE, SIZE)),
        "gradient": xx * 0.9 + 0.05,
        "diagonal+noise": 0.3 + 0.4 * (xx + yy) / 2 + 0.01 * rng.standard_normal((SIZE, SIZE)),
        "vignette": 0.8 - 0.6 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2),
        "label_on_black": _label_on_black() / 255.0,
    }


def blank_files() -> dict[str, bytes]:
    rng = np.random.default_rng(6)
    out: dict[str, bytes] = {}
    for name, x in blank_kinds().items():
        out[f"{name}.png"] = png_bytes(to8(x))
        out[f"{name}.jpg"] = jpeg_bytes(to8(x))
        out[f"{name}.16.png"] = png16(np.clip(x, 0, 1) * 65535)
    # 16-bit PNGs are scaled from their own minimum to maximum: a little noise becomes full range.
    out["uniform+noise.16.png"] = png16(30000 + rng.integers(-40, 40, (SIZE, SIZE)))
    out["uniform+uniform-noise.16.png"] = png16(rng.integers(0, 65535, (SIZE, SIZE)))
    zero = chest_dataset(SIZE, sop_class=DX_STORAGE)
    zero.PixelData = np.zeros((SIZE, SIZE), np.uint16).tobytes()
    out["zero_dx_windowed.dcm"] = to_bytes(zero)
    out["zero_dx_no_window.dcm"] = to_bytes(chest_dataset(SIZE, sop_class=DX_STORAGE, WindowCenter=None,
                                                          WindowWidth=None, PixelData=zero.PixelData))
    grey = chest_dataset(SIZE, WindowCenter=None, WindowWidth=None)
    grey.PixelData = (2000 + rng.integers(0, 6, (SIZE, SIZE))).astype(np.uint16).tobytes()
    out["grey+noise_cr.dcm"] = to_bytes(grey)
    return out


@pytest.mark.parametrize("name", sorted(blank_files()))
def test_blank_images_are_refused_before_inference(name, screener, tmp_path):
    data = blank_files()[name]
    with pytest.raises(Rejected) as e:
        gated_pixels(data)
    assert e.value.code == "blank_image" and "blank" in e.value.message
    heat = tmp_path / "h.jpg"
    out = screener.screen(data, heatmap_to=heat)
    assert out.status == "rejected" and out.reject_code == "blank_image" and out.probabilities is None
    assert not heat.exists() and out.heatmap_path is None


def real_films() -> dict[str, bytes]:
    """Real (pydicom-data RG1) and realistic synthetic chest films in every format and depth."""
    out = {f"RG1_{n}": Path(get_testdata_file(f"RG1_{n}.dcm")).read_bytes() for n in ("UNCR", "UNCI", "J2KR")}
    rg1 = rg1_pixels()
    out["RG1.png"], out["RG1.jpg"] = png_bytes(to8(rg1)), jpeg_bytes(to8(rg1))
    out["RG1.16.png"] = png16(rg1 * 65535)
    for seed in range(3):
        out[f"chest{seed}.png"] = png_bytes(chest_like(SIZE, seed=seed))
        out[f"chest{seed}.jpg"] = jpeg_bytes(chest_like(224, seed=seed))
        out[f"chest{seed}.16.png"] = png16(chest_like(512, seed=seed, bits=16))
        out[f"chest{seed}.dcm"] = to_bytes(chest_dataset(SIZE, seed=seed))
        out[f"chest{seed}_mono1.dcm"] = to_bytes(chest_dataset(SIZE, seed=seed, photometric="MONOCHROME1"))
    return out


def test_no_real_or_realistic_chest_film_is_blank():
    for name, data in real_films().items():
        pixels, meta = gated_pixels(data)
        assert detail(pixels) >= 2 * MIN_DETAIL, name
        assert not meta.get("notes"), (name, meta.get("notes"))  # and none is taken for a negative


def marked_16bit_films() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """12-bit films in 16-bit PNGs with burned-in graphics at the container's top (or bottom)
    value: name -> (the marked stored values, the mask of the marks)."""
    film = chest_like(512, seed=4, bits=12).astype(np.uint16)
    out = {}
    for name, (rows, cols), value in (("label_65535", (slice(8, 20), slice(8, 60)), 65535),
                                      ("border_65535", (slice(None), slice(0, 2)), 65535),
                                      ("marker_40000", (slice(480, 500), slice(480, 500)), 40000)):
        marked, mask = film.copy(), np.zeros(film.shape, bool)
        marked[rows, cols], mask[rows, cols] = value, True
        out[name] = (marked, mask)
    return out


@pytest.mark.parametrize("name", sorted(marked_16bit_films()))
def test_burned_in_marks_at_the_top_value_do_not_darken_a_16bit_png(name):
    """Like a DICOM without a window, a 16-bit PNG is shown over its robust (0.5-99.5 %) range,
    so a few marked pixels at 65535 do not squeeze a 12-bit film into 1/16 of the grey levels
    (it was then refused as blank_image, or scored almost black)."""
    marked, mask = marked_16bit_films()[name]
    pixels, meta = gated_pixels(png16(marked))
    lo, hi = np.percentile(marked, [0.5, 99.5])  # the rendering, computed here
    expected = np.clip((marked.astype(np.float64) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(pixels, expected, atol=1e-5)
    clean = gated_pixels(png16(chest_like(512, seed=4, bits=12)))[0]
    assert float(np.abs(pixels - clean)[~mask].max()) < 0.1 and not meta.get("notes")  # was ~0.9 darker


def test_blank_rule_can_be_turned_off():
    data = blank_files()["grey.png"]
    pixels, _ = gated_pixels(data, ScreenOptions(gate=GateRules(blank_image=False)))
    assert pixels.shape == (SIZE, SIZE)


# The content-check hook -----------------------------------------------------------------


def test_content_checks_plug_in_after_the_blank_check():
    seen: list[tuple] = []

    def ood(pixels: np.ndarray) -> Rejection | None:
        seen.append((pixels.shape, pixels.dtype, float(pixels.min()), float(pixels.max())))
        return Rejection(Code.not_chest, "the picture does not look like a chest radiograph (test check)")

    options = ScreenOptions(content_checks=(ood,))
    with pytest.raises(Rejected) as e:
        gated_pixels(png_bytes(chest_like(SIZE)), options)
    assert e.value.code == "not_chest" and seen[0][:2] == ((SIZE, SIZE), np.float32)
    assert 0.0 <= seen[0][2] <= seen[0][3] <= 1.0
    with pytest.raises(Rejected) as e:  # blank comes first: the hook never sees an empty picture
        gated_pixels(blank_files()["black.png"], options)
    assert e.value.code == "blank_image" and len(seen) == 1
    assert gated_pixels(png_bytes(chest_like(SIZE)), ScreenOptions(content_checks=(lambda p: None,)))
    # After the polarity check: a negative PNG reaches the hook as the positive the model sees.
    got = []
    gated_pixels(png_bytes(255 - chest_like(SIZE)), ScreenOptions(content_checks=(lambda p: got.append(p),)))
    np.testing.assert_allclose(got[0], chest_like(SIZE) / 255.0, atol=1e-6)


# Polarity of PNG and JPEG exports -------------------------------------------------------


def negatives() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (a negative export, the positive picture it should be screened as)."""
    rg1 = rg1_pixels()
    out = {"RG1_neg.png": (png_bytes(to8(1 - rg1)), to8(rg1) / 255.0),
           "RG1_neg.16.png": (png16((1 - rg1) * 65535), None)}
    for seed in range(3):
        pos = chest_like(SIZE, seed=seed)
        out[f"chest{seed}_neg.png"] = (png_bytes(255 - pos), pos / 255.0)
        out[f"chest{seed}_neg.jpg"] = (jpeg_bytes(255 - chest_like(512, seed=seed)), None)
    return out


@pytest.mark.parametrize("name", sorted(negatives()))
def test_a_negative_png_or_jpeg_is_inverted_and_the_inversion_recorded(name, screener):
    data, positive = negatives()[name]
    pixels, meta = gated_pixels(data)
    assert len(meta["notes"]) == 1 and meta["notes"][0].startswith("polarity_inverted: ")
    raw = decode(data).pixels
    np.testing.assert_allclose(pixels, 1.0 - raw, atol=1e-6)
    if positive is not None:
        np.testing.assert_allclose(pixels, positive, atol=1.5 / 255)
    out = screener.screen(data)
    assert out.status == "done" and out.notes == meta["notes"]


def test_polarity_can_refuse_instead_or_be_off():
    data, _ = negatives()["chest0_neg.png"]
    with pytest.raises(Rejected) as e:
        gated_pixels(data, ScreenOptions(gate=GateRules(polarity="reject")))
    assert e.value.code == "inverted_polarity" and "negative" in e.value.message
    pixels, meta = gated_pixels(data, ScreenOptions(gate=GateRules(polarity="off")))
    assert "notes" not in meta and np.array_equal(pixels, decode(data).pixels)


def test_polarity_scores_separate_films_from_their_negatives():
    rg1 = rg1_pixels()
    for pos in [rg1] + [chest_like(s_, seed=k) / 255.0 for k in range(4) for s_ in (224, 600)]:
        assert polarity_score(pos) > POLARITY_THRESHOLD
        assert polarity_score(1.0 - pos) < -POLARITY_THRESHOLD


def sideways_films() -> dict[str, bytes]:
    """Positive films sent rotated by a right angle: pixels stored sideways (PNG), or stored
    upright with an EXIF Orientation that turns them (JPEG, applied on decoding)."""
    rg1 = rg1_pixels()
    out = {f"RG1_rot{k * 90}.png": png_bytes(to8(np.rot90(rg1, k))) for k in (1, 3)}
    for seed in range(3):
        out[f"chest{seed}_rot90.png"] = png_bytes(np.ascontiguousarray(np.rot90(chest_like(SIZE, seed=seed))))
    for orientation in (6, 8):  # 90 degrees clockwise / counter-clockwise on display
        exif = Image.Exif()
        exif[0x0112] = orientation
        for name, arr in (("RG1", to8(rg1)), ("chest0", chest_like(SIZE, seed=0))):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=92, exif=exif.tobytes())
            out[f"{name}_exif{orientation}.jpg"] = buf.getvalue()
    return out


@pytest.mark.parametrize("name", sorted(sideways_films()))
def test_a_positive_film_sent_sideways_is_not_taken_for_a_negative(name):
    pixels, meta = gated_pixels(sideways_films()[name])
    assert not meta.get("notes"), meta.get("notes")
    assert np.array_equal(pixels, decode(sideways_films()[name]).pixels)  # screened as sent, not inverted


def test_dicom_photometric_interpretation_stays_authoritative():
    # A MONOCHROME2 DICOM whose pixels are a negative is shown as its header says: never inverted.
    neg = chest_dataset(SIZE, seed=3)
    neg.PixelData = (4095 - chest_like(SIZE, seed=3, bits=12)).astype(np.uint16).tobytes()
    pixels, meta = gated_pixels(to_bytes(neg))
    assert "notes" not in meta and np.array_equal(pixels, decode(to_bytes(neg)).pixels)
    # ...and a MONOCHROME1 film is inverted by its header, once.
    mono1, meta1 = gated_pixels(to_bytes(chest_dataset(SIZE, seed=3, photometric="MONOCHROME1")))
    assert "notes" not in meta1
    np.testing.assert_allclose(mono1, decode(to_bytes(chest_dataset(SIZE, seed=3))).pixels, atol=1e-6)


# DICOM anatomy without BodyPartExamined ----------------------------------------------------

CHEST = GateRules().chest_body_parts


def region(code: str | None, meaning: str | None) -> Sequence:
    item = Dataset()
    if code:
        item.CodeValue, item.CodingSchemeDesignator = code, "SCT"
    if meaning:
        item.CodeMeaning = meaning
    return Sequence([item])


@pytest.mark.parametrize("tags, field", [
    ({"StudyDescription": "XR KNEE 2 VIEWS LT"}, "StudyDescription"),
    ({"SeriesDescription": "Hand PA"}, "SeriesDescription"),
    ({"ProtocolName": "SKULL AP/LAT"}, "ProtocolName"),
    ({"StudyDescription": "Rx pie izquierdo"}, "StudyDescription"),
    ({"SeriesDescription": "Abdomen supine"}, "SeriesDescription"),
    ({"StudyDescription": "Cervical spine"}, "StudyDescription"),
    ({"SeriesDescription": "Thoracic spine AP"}, "SeriesDescription"),
    ({"AnatomicRegionSequence": region("72696002", None)}, "AnatomicRegionSequence"),
    ({"AnatomicRegionSequence": region("T-D9700", "Foot")}, "AnatomicRegionSequence"),
    ({"SeriesDescription": "Pelvis AP", "StudyDescription": "Chest and pelvis"}, "SeriesDescription"),
])
def test_anatomy_from_other_fields_refuses_what_is_not_a_chest(tags, field):
    ds = chest_dataset(SIZE, **({"BodyPartExamined": None, "StudyDescription": "Routine"} | tags))
    with pytest.raises(Rejected) as e:
        gated_pixels(to_bytes(ds))
    assert e.value.code == "not_chest" and f"{field} names" in e.value.message
    for text in tags.values():  # the free text itself is never quoted, only the word matched
        if isinstance(text, str):
            assert text not in e.value.message


@pytest.mark.parametrize("tags", [
    {"SeriesDescription": "Tórax PA", "StudyDescription": "Rodilla"},
    {"SeriesDescription": "THX AP portable", "StudyDescription": "Knee"},
    {"SeriesDescription": "CXR PA", "StudyDescription": "Knee and chest"},
    {"ProtocolName": "Lungs", "StudyDescription": "ABDOMEN"},
    {"AnatomicRegionSequence": region("43799004", None), "StudyDescription": "KNEE"},
    {"AnatomicRegionSequence": region(None, "Thorax")},
    {"StudyDescription": "Routine"},
    {"ProtocolName": "Thoracic PA"},
    {},
    {"BodyPartExamined": "CHEST", "StudyDescription": "KNEE"},  # BodyPartExamined decides when present
])
def test_anatomy_from_other_fields_passes_chests_and_the_unknown(tags):
    ds = chest_dataset(SIZE, **({"BodyPartExamined": None} | tags))
    pixels, meta = gated_pixels(to_bytes(ds))
    assert pixels.shape == (SIZE, SIZE)
    assert set(meta["anatomy"]) <= set(ANATOMY_FIELDS)


def test_anatomy_rule_follows_its_switch_and_the_chest_words():
    with pytest.raises(ValueError, match="polarity"):
        GateRules(polarity="maybe")
    meta = {"anatomy": {"StudyDescription": "Brustkorb p.a."}}
    assert check_anatomy(meta, CHEST) is None
    assert check_anatomy({"anatomy": {"StudyDescription": "Knee"}}, CHEST).code is Code.not_chest
    ds = chest_dataset(SIZE, BodyPartExamined=None, StudyDescription="Knee")
    assert gated_pixels(to_bytes(ds), ScreenOptions(gate=GateRules(not_chest=False)))[0].shape == (SIZE, SIZE)


@pytest.mark.parametrize("modality", ["CT", "MR", "US"])
def test_ct_and_mr_objects_are_not_radiographs(modality):
    with pytest.raises(Rejected) as e:
        gated_pixels(to_bytes(chest_dataset(SIZE, Modality=modality)))
    assert e.value.code == "not_radiograph"


# The minimum size comes from the bundle ----------------------------------------------------


def test_minimum_size_is_derived_from_the_bundle_input_size(screener):
    assert min_size_for(224) == 112 and min_size_for(64) == 32 and min_size_for(384) == 192
    assert screener.options.gate.effective_min_size == 32  # the tiny test bundle reads 64 px
    opts = ScreenOptions().for_input_size(224)
    for size in (224, 112, 191):  # what the trainer keeps passes: 224 px films for a 224 px model
        pixels, _ = gated_pixels(png_bytes(chest_like(size)), opts)
        assert pixels.shape == (size, size)
    with pytest.raises(Rejected) as e:
        gated_pixels(png_bytes(chest_like(96)), opts)
    assert e.value.code == "too_small" and "under 112 px" in e.value.message
    fixed = ScreenOptions(gate=GateRules(min_size=300)).for_input_size(224)  # CXR_GATE_MIN_SIZE wins
    assert fixed.gate.effective_min_size == 300
