"""Grad-CAM from the saved feature map equals grad-cam's full-model map; the heatmap policy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.settings import PROJECT_ROOT
from tests.imagegen import write_png
from worker.screening.explain import gradcam, gradcam_from_features
from worker.screening.model import load_bundle
from worker.screening.pipeline import ScreenOptions, Screener, model_input

SHIPPED = PROJECT_ROOT / "models" / "cxr-default.safetensors"


def bundles(tiny_bundle: Path) -> list[Path]:
    return [tiny_bundle] + ([SHIPPED] if SHIPPED.exists() else [])


def test_head_only_gradcam_equals_full_model_gradcam(tmp_path, tiny_bundle):
    for bundle in bundles(tiny_bundle):
        loaded = load_bundle(bundle)
        model = loaded.model
        for seed in range(3):
            _, x, _ = model_input(write_png(tmp_path / f"{seed}.png", seed=seed).read_bytes(), loaded.meta)
            tensor = torch.from_numpy(x[None])
            with torch.no_grad():
                feats = model.last_conv(tensor)
                split_logits = model.from_last_conv(feats)
                full_logits = model(tensor)
            assert torch.allclose(split_logits, full_logits, atol=1e-6)
            for target in range(3):
                cheap = gradcam_from_features(model, feats, target_classes=[target], size=x.shape[1:])[0]
                full = gradcam(model, x, target_class=target)
                assert cheap.shape == full.shape == x.shape[1:]
                assert np.abs(cheap - full).max() <= 1e-4, (bundle.name, seed, target)


@pytest.mark.parametrize("policy", ["all", "flagged", "none"])
def test_heatmap_policy_is_honoured(tmp_path, tiny_bundle, policy):
    loaded = load_bundle(tiny_bundle)
    # Thresholds that flag Tuberculosis always and Pneumonia never make the outcome predictable.
    for flag in (True, False):
        meta = replace(loaded.meta, thresholds={"Tuberculosis": 0.0 if flag else 1.1})
        screener = Screener(replace(loaded, meta=meta), ScreenOptions(heatmaps=policy))
        out = screener.screen(write_png(tmp_path / "a.png").read_bytes(), heatmap_to=tmp_path / f"h{flag}.png")
        assert out.status == "done" and out.flagged is flag
        expected = policy == "all" or (policy == "flagged" and flag)
        assert (out.heatmap_path is not None) is expected
        assert (tmp_path / f"h{flag}.png").exists() is expected
        assert ("gradcam" in out.timings_ms) is expected


def test_overlay_is_the_documented_blend_of_radiograph_and_jet_map():
    """The fast uint8 renderer (lookup table, cv2) equals the float formula
    0.6 * radiograph + 0.4 * jet(map) to within two grey levels (8-bit map quantisation:
    jet's steepest slope is 4 per unit, so half a level of the map moves a colour by 0.8)."""
    from worker.screening.explain import jet, overlay_rgb

    rng = np.random.default_rng(3)
    pixels = rng.random((300, 240)).astype(np.float32)  # below 512 px: no resizing
    cam = rng.random((300, 240)).astype(np.float32)
    expected = np.clip(0.6 * pixels[..., None] + 0.4 * jet(cam), 0, 1) * 255
    got = overlay_rgb(pixels, cam).astype(np.float64)
    assert got.shape == (300, 240, 3)
    assert np.abs(got - expected).max() <= 2.0
    big = overlay_rgb(rng.random((2048, 1024)).astype(np.float32), cam)
    assert big.shape == (512, 256, 3)


def test_batched_gradcam_equals_one_map_at_a_time(tmp_path, tiny_bundle):
    """The worker computes the Grad-CAMs of a whole batch in one backward pass through the
    head; each map equals the one computed for that study alone (and only wanted ones are made)."""
    from worker.screening.pipeline import ScreenOptions, Screener, gated_pixels, to_model

    screener = Screener(load_bundle(tiny_bundle), ScreenOptions(heatmaps="all"))
    x = np.stack([to_model(gated_pixels(write_png(tmp_path / f"{i}.png", seed=70 + i).read_bytes())[0],
                           screener.meta) for i in range(5)])
    rows = screener._step(x, [True, True, False, True, True])
    assert rows[2][2] is None
    batch = [(p, cam_of()[0] if cam_of else None) for p, _, cam_of in rows]  # the first call computes all four
    assert all(batch[i][1].max() > batch[i][1].min() for i in (0, 1, 3, 4))  # real maps, not blanks
    for i in (0, 1, 3, 4):
        probs, _, cam_of = screener._step(x[i:i + 1], [True])[0]
        cam = cam_of()[0]
        assert np.abs(batch[i][0] - probs).max() <= 1e-5
        assert batch[i][1].shape == cam.shape == x.shape[2:]
        assert np.abs(batch[i][1] - cam).max() <= 1e-4, i
    assert all(cam_of is None for _, _, cam_of in screener._step(x[:2], [False, False]))
