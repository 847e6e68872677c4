"""Grad-CAM heatmaps (the ``grad-cam`` package) and their rendering as a PNG overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from worker.screening.model import CxrNet

OVERLAY_MAX_SIDE = 512


def gradcam(model: CxrNet, x: np.ndarray, *, target_class: int) -> np.ndarray:
    """Grad-CAM for one input (C, H, W) at the last convolution -> (H, W) in [0, 1]."""
    dev = next(model.parameters()).device
    tensor = torch.from_numpy(x[None]).to(dev)
    with torch.enable_grad(), GradCAM(model=model, target_layers=[model.cam_target_layer()]) as cam:
        maps = cam(input_tensor=tensor, targets=[ClassifierOutputTarget(target_class)])
    return np.asarray(maps[0], dtype=np.float32)


def jet(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to RGB with the classic jet ramp (blue -> cyan -> yellow -> red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1)


def render_overlay(pixels: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4) -> Image.Image:
    """Blend the heatmap over the radiograph at up to 512 px on the long side."""
    h, w = pixels.shape
    scale = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = np.asarray(Image.fromarray(np.asarray(pixels, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR))
    heat = np.asarray(Image.fromarray(np.asarray(cam, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR))
    rgb = (1 - alpha) * np.clip(base, 0, 1)[..., None] + alpha * jet(heat)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def render_heatmap(pixels: np.ndarray, cam: np.ndarray) -> Image.Image:
    """The heatmap alone (jet colours), at the overlay's size."""
    h, w = pixels.shape
    scale = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    heat = np.asarray(Image.fromarray(np.asarray(cam, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR))
    return Image.fromarray((jet(heat) * 255).round().astype(np.uint8))


def heatmap_only_path(overlay_path: Path) -> Path:
    """Where the bare heatmap is kept next to the overlay: ``<id>.png`` -> ``<id>.cam.png``."""
    return overlay_path.with_name(overlay_path.stem + ".cam.png")


def save_heatmap(pixels: np.ndarray, cam: np.ndarray, path: Path) -> Path:
    """Write the overlay (heatmap blended on the radiograph) at ``path`` and the bare heatmap
    beside it (``heatmap_only_path``). Returns the overlay's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for image, dest in ((render_heatmap(pixels, cam), heatmap_only_path(path)), (render_overlay(pixels, cam), path)):
        tmp = dest.with_name(dest.name + ".tmp")
        image.save(tmp, format="PNG")
        tmp.replace(dest)
    return path
