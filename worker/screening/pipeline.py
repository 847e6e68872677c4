"""decode -> preprocess -> infer -> explain for one file's bytes.

Shared by ``cxr predict`` and the Celery worker, so both give identical probabilities.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr.bundle import BundleMeta
from worker.screening.decode import ImageDecodeError, decode
from worker.screening.explain import gradcam, save_heatmap
from worker.screening.infer import infer
from worker.screening.model import LoadedModel
from worker.screening.preprocess import preprocess

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: str  # "done" | "failed"
    probabilities: dict[str, float] | None = None
    predicted_class: str | None = None
    risk: float | None = None
    flagged: bool | None = None
    heatmap_path: str | None = None
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def risk_and_flag(probs: dict[str, float], meta: BundleMeta) -> tuple[float, bool]:
    """Risk = 1 - P(Normal). Flagged when any class reaches its stored operating-point
    threshold; a bundle without thresholds flags any non-Normal prediction."""
    risk = 1.0 - probs["Normal"] if "Normal" in probs else max(probs.values())
    if meta.thresholds:
        flagged = any(probs.get(c, 0.0) >= t for c, t in meta.thresholds.items())
    else:
        flagged = max(probs, key=probs.__getitem__) != "Normal"
    return float(risk), bool(flagged)


def model_input(data: bytes, meta: BundleMeta, *, max_pixels: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """bytes -> (decoded pixels, model input (C, H, W), metadata). Raises ImageDecodeError."""
    decoded = decode(data, max_pixels=max_pixels)
    x = preprocess(decoded.pixels, input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std)
    return decoded.pixels, x, decoded.metadata


class Screener:
    """A loaded model plus the steps around it."""

    def __init__(self, loaded: LoadedModel, *, max_pixels: int = 80_000_000) -> None:
        self.loaded = loaded
        self.meta = loaded.meta
        self.max_pixels = max_pixels

    def screen(self, data: bytes, *, heatmap_to: Path | None = None) -> Outcome:
        t0 = time.perf_counter()
        try:
            pixels, x, metadata = model_input(data, self.meta, max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            return Outcome(status="failed", error=str(e))
        t1 = time.perf_counter()
        probs_arr = infer(self.loaded.model, x[None], temperature=self.meta.temperature, device=self.loaded.device)[0]
        t2 = time.perf_counter()
        probs = {c: float(p) for c, p in zip(self.meta.classes, probs_arr)}
        predicted = max(probs, key=probs.__getitem__)
        risk, flagged = risk_and_flag(probs, self.meta)
        heatmap_path = None
        timings = {"decode_preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3}
        if heatmap_to is not None:
            cam = gradcam(self.loaded.model, x, target_class=self.meta.classes.index(predicted))
            heatmap_path = str(save_heatmap(pixels, cam, heatmap_to))
            timings["gradcam"] = (time.perf_counter() - t2) * 1e3
        return Outcome(
            status="done",
            probabilities=probs,
            predicted_class=predicted,
            risk=risk,
            flagged=flagged,
            heatmap_path=heatmap_path,
            timings_ms={k: round(v, 2) for k, v in timings.items()},
            metadata=metadata,
        )
