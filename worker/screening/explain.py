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
OVERLAY_JPEG_QUALITY = 90


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


# jet() sampled at the 256 levels of an 8-bit map: colouring is then one table lookup.
JET_LUT = (jet(np.linspace(0.0, 1.0, 256)) * 255).round().astype(np.uint8)


def _overlay_size(shape: tuple[int, ...]) -> tuple[int, int]:
    h, w = shape[:2]
    scale = min(1.0, OVERLAY_MAX_SIDE / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_u8(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[0, 1] float map -> uint8 at ``size`` (w, h), resized bilinearly (cv2 releases the GIL)."""
    resized = cv2.resize(np.asarray(values, dtype=np.float32), size, interpolation=cv2.INTER_AREA
                         if size[0] < values.shape[1] else cv2.INTER_LINEAR)
    return (np.clip(resized, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# The same table for OpenCV (BGR, 256 x 1 x 3): cv2.applyColorMap colours a 512 px map in
# ~0.1 ms where numpy's table lookup takes ~2 ms.
_JET_LUT_BGR = np.ascontiguousarray(JET_LUT[:, ::-1].reshape(256, 1, 3))


def _overlay_bgr(pixels: np.ndarray, cam: np.ndarray, alpha: float) -> np.ndarray:
    size = _overlay_size(pixels.shape)
    base = cv2.cvtColor(_to_u8(pixels, size), cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap(_to_u8(cam, size), _JET_LUT_BGR)
    return cv2.addWeighted(base, 1.0 - alpha, heat, alpha, 0.0)


def _heatmap_bgr(cam: np.ndarray) -> np.ndarray:
    return cv2.applyColorMap(_to_u8(cam, (cam.shape[1], cam.shape[0])), _JET_LUT_BGR)


def overlay_rgb(pixels: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """The heatmap blended over the radiograph, (h, w, 3) uint8, at up to 512 px on the long side."""
    return np.ascontiguousarray(_overlay_bgr(pixels, cam, alpha)[..., ::-1])


def heatmap_rgb(cam: np.ndarray) -> np.ndarray:
    """The heatmap alone in jet colours, (h, w, 3) uint8, at the map's own resolution (the
    model's input size): it is smooth, so a viewer scales it up without loss."""
    return np.ascontiguousarray(_heatmap_bgr(cam)[..., ::-1])


def render_overlay(pixels: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4) -> Image.Image:
    """Blend the heatmap over the radiograph at up to 512 px on the long side."""
    return Image.fromarray(overlay_rgb(pixels, cam, alpha=alpha))


def render_heatmap(cam: np.ndarray) -> Image.Image:
    """The heatmap alone (jet colours), at the map's resolution."""
    return Image.fromarray(heatmap_rgb(cam))


def heatmap_only_path(overlay_path: Path) -> Path:
    """Where the bare heatmap is kept next to the overlay: ``<id>.png`` -> ``<id>.cam.png``."""
    return overlay_path.with_name(overlay_path.stem + ".cam.png")


def _write_atomic(data: bytes, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)  # a reader never sees half a file


def _encode_bgr(bgr: np.ndarray, ext: str, params: list[int]) -> bytes:
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise OSError(f"OpenCV could not encode a {ext[1:].upper()}")
    return buf.tobytes()


def _png_bgr(bgr: np.ndarray) -> bytes:
    """BGR uint8 -> PNG bytes (OpenCV: faster than Pillow here, and it releases the GIL)."""
    return _encode_bgr(bgr, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1])


def _jpeg_bgr(bgr: np.ndarray, quality: int = OVERLAY_JPEG_QUALITY) -> bytes:
    return _encode_bgr(bgr, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality])


def save_heatmap(pixels: np.ndarray, cam: np.ndarray, path: Path) -> Path:
    """Write the overlay (heatmap blended on the radiograph) and the bare heatmap beside it
    (``heatmap_only_path``). Returns the overlay's path.

    The overlay is a JPEG when ``path`` ends in ``.jpg``: at 512 px it encodes in ~2 ms where
    a PNG of the same picture takes 20-40 ms, which was most of a heatmap's cost. The API
    serves it as PNG on request. The bare map is small and smooth, so it stays a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(_png_bgr(_heatmap_bgr(cam)), heatmap_only_path(path))  # OpenCV's own BGR order: no copies
    overlay = _overlay_bgr(pixels, cam, 0.4)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    _write_atomic(_jpeg_bgr(overlay) if jpeg else _png_bgr(overlay), path)
    return path
