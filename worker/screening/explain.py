"""Grad-CAM heatmaps (the ``grad-cam`` package) and their rendering as a PNG overlay."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from worker.screening.model import CxrNet

OVERLAY_MAX_SIDE = 512


class _FromLastConv(nn.Module):
    """The network after its last convolution, fed the saved feature map.

    Grad-CAM at ``conv_head`` needs gradients only through what follows it (BN, pooling and
    the head), so running ``grad-cam`` on this small module, with the feature map kept from
    the forward pass that produced the probabilities, gives the same map as a full-model
    Grad-CAM for a fraction of the cost (no backbone forward or backward)."""

    def __init__(self, model: CxrNet) -> None:
        super().__init__()
        self.model = model
        self.features = nn.Identity()  # grad-cam's target layer: its output is the feature map

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.model.from_last_conv(self.features(a))


def gradcam_from_features(
    model: CxrNet, features: torch.Tensor, *, target_classes: list[int], size: tuple[int, int]
) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] from conv_head feature maps (N, C, h, w).

    grad-cam normalises each map at feature resolution; it is then resized to ``size`` with
    the cv2 bilinear resize grad-cam uses and normalised again, exactly as grad-cam finishes a
    full-model map, so the two agree."""
    wrapper = _FromLastConv(model)
    feats = features.detach().requires_grad_(True)
    with torch.enable_grad(), GradCAM(model=wrapper, target_layers=[wrapper.features]) as cam:
        maps = cam(input_tensor=feats, targets=[ClassifierOutputTarget(c) for c in target_classes])
    h, w = size
    # As grad-cam does for the full model: resize each layer map to the input size, then
    # normalise the result again.
    return scale_cam_image(np.stack([cv2.resize(np.float32(m), (w, h)) for m in maps]))


def gradcam(model: CxrNet, x: np.ndarray, *, target_class: int) -> np.ndarray:
    """Full-model Grad-CAM for one input (C, H, W) at the last convolution -> (H, W) in [0, 1].

    The reference implementation (backbone forward and backward); the worker uses
    :func:`gradcam_from_features` where the backbone allows it."""
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
        image.save(tmp, format="PNG", compress_level=1)  # encoding dominates a heatmap's cost
        tmp.replace(dest)
    return path
