"""The quality gate: pure rules, their switches, and the settings that build them."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.settings import Settings
from tests.dicomgen import chest_dataset, multi_frame, to_bytes
from worker.screening.decode import decode
from worker.screening.gate import (
    Code,
    GateRules,
    check_body_part,
    check_header,
    check_image,
    check_modality,
    check_view,
    status_for,
)
from worker.screening.pipeline import Rejected, ScreenOptions, gated_pixels
from worker.service import screen_options

CHEST = GateRules().chest_body_parts


@pytest.mark.parametrize("modality, ok", [("CR", True), ("DX", True), ("dr", True), (None, True), ("", True),
                                          ("CT", False), ("MR", False), ("OT", False)])
def test_modality(modality, ok):
    r = check_modality(modality)
    assert (r is None) == ok
    if r:
        assert r.code is Code.not_radiograph and "CXR_GATE_NOT_RADIOGRAPH" in r.message


@pytest.mark.parametrize("part, ok", [("CHEST", True), ("THORAX", True), ("chest pa", True), ("PORT CHEST", True),
                                      ("LUNG", True), (None, True), ("  ", True), ("HAND", False),
                                      ("ABDOMEN", False), ("SKULL", False), ("CHESTNUT", False)])
def test_body_part_synonyms(part, ok):
    r = check_body_part(part, CHEST)
    assert (r is None) == ok
    if r:
        assert r.code is Code.not_chest and "CXR_GATE_CHEST_BODY_PARTS" in r.message


@pytest.mark.parametrize("view, ok", [("PA", True), ("AP", True), (None, True), ("LL", False), ("RL", False),
                                      ("LATERAL", False)])
def test_view(view, ok):
    r = check_view(view)
    assert (r is None) == ok
    if r:
        assert r.code is Code.lateral_view and "frontal" in r.message


def test_each_rule_can_be_turned_off():
    meta = {"modality": "CT", "body_part": "HAND", "view_position": "LL", "frames": 3}
    assert check_header(meta, GateRules()).code is Code.not_radiograph
    assert check_header(meta, GateRules(not_radiograph=False)).code is Code.not_chest
    assert check_header(meta, GateRules(not_radiograph=False, not_chest=False)).code is Code.lateral_view
    off3 = GateRules(not_radiograph=False, not_chest=False, lateral_view=False)
    assert check_header(meta, off3).code is Code.multi_frame
    assert check_header(meta, GateRules(False, False, False, False)) is None
    # Without a bundle the minimum is derived from a 224 px model: ceil(0.5 * 224) = 112.
    assert check_image((111, 1024), GateRules()).code is Code.too_small
    assert check_image((112, 1024), GateRules()) is None
    assert check_image((1, 1), GateRules(too_small=False)) is None
    assert check_image((300, 300), GateRules(min_size=512)).code is Code.too_small


def test_codec_missing_is_a_failure_of_the_installation_everything_else_a_rejection():
    assert status_for("codec_missing") == "failed"
    assert {status_for(c) for c in Code if c is not Code.codec_missing} == {"rejected"}


def test_settings_build_the_rules(monkeypatch):
    monkeypatch.setenv("CXR_GATE_LATERAL_VIEW", "false")
    monkeypatch.setenv("CXR_GATE_MIN_SIZE", "128")
    monkeypatch.setenv("CXR_GATE_CHEST_BODY_PARTS", "chest, torso")
    monkeypatch.setenv("CXR_VOI_FALLBACK_PERCENTILES", "1,99")
    opts = screen_options(Settings(_env_file=None))
    assert opts.gate.lateral_view is False and opts.gate.not_chest is True and opts.gate.min_size == 128
    assert opts.gate.chest_body_parts == {"CHEST", "TORSO"}
    assert opts.voi.fallback_percentiles == (1.0, 99.0)
    monkeypatch.setenv("CXR_VOI_FALLBACK_PERCENTILES", "99,1")
    with pytest.raises(ValueError, match="low < high"):
        Settings(_env_file=None)


def test_header_rules_run_before_the_pixels_are_decoded():
    # A lateral film whose pixel data is garbage: the gate answers from the header alone.
    ds = chest_dataset(ViewPosition="LL")
    ds.PixelData = b"\x00" * 10
    with pytest.raises(Rejected) as e:
        gated_pixels(to_bytes(ds))
    assert e.value.code == "lateral_view" and e.value.metadata["view_position"] == "LL"


def test_multi_frame_rejected_unless_single_frame_or_rule_off():
    with pytest.raises(Rejected) as e:
        gated_pixels(multi_frame(2))
    assert e.value.code == "multi_frame" and "2 frames" in e.value.message
    pixels, meta = gated_pixels(multi_frame(1))  # a single frame wrapped as multi-frame
    assert pixels.shape == (320, 320) and meta["frames"] == 1
    first, _ = gated_pixels(multi_frame(2), ScreenOptions(gate=GateRules(multi_frame=False)))
    np.testing.assert_array_equal(first, decode(to_bytes(chest_dataset(seed=0))).pixels)  # frame 0 is seed 0
