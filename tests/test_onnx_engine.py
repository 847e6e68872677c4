"""The onnxruntime engine agrees with torch (probabilities within 1e-4) and is exported once."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.imagegen import write_dicom, write_png
from worker.screening.model import load_bundle
from worker.screening.pipeline import ScreenOptions, Screener


def test_onnx_matches_torch_and_caches_the_export(tmp_path, tiny_bundle):
    loaded = load_bundle(tiny_bundle)
    cache = tmp_path / "onnx"
    onnx = Screener(loaded, ScreenOptions(engine="onnx", cache_dir=cache))
    torch_ = Screener(loaded, ScreenOptions(engine="torch"))
    exported = list(cache.glob("*.onnx"))
    assert len(exported) == 1 and loaded.sha256 in exported[0].name
    files = [write_png(tmp_path / f"{i}.png", seed=i) for i in range(3)] + [write_dicom(tmp_path / "d.dcm")]
    for f in files:
        a = onnx.screen(f.read_bytes(), heatmap_to=tmp_path / f"{f.stem}-onnx.png")
        b = torch_.screen(f.read_bytes(), heatmap_to=tmp_path / f"{f.stem}-torch.png")
        assert a.status == b.status == "done"
        diff = max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities)
        assert diff <= 1e-4, (f.name, diff)
        ha = np.asarray(Image.open(a.heatmap_path), dtype=np.float32)
        hb = np.asarray(Image.open(b.heatmap_path), dtype=np.float32)
        assert np.abs(ha - hb).max() <= 2  # 8-bit overlays from CAMs equal to ~1e-4
    mtime = exported[0].stat().st_mtime_ns
    Screener(loaded, ScreenOptions(engine="onnx", cache_dir=cache))  # a second worker process
    assert exported[0].stat().st_mtime_ns == mtime  # reused, not exported again
    assert not loaded.model.training
