"""Turn a decoded grey image into the model's input tensor, as the bundle prescribes.

``preprocess = normalize(resize(pixels))``. The trainer calls ``resize`` and ``normalize``
itself, with augmentation in between, so training and serving share the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a (H, W) float image in [0, 1] to (size, size): the whole film, no crop."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {pixels.shape}")
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # float32 -> mode "F"
    out = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def normalize(x: np.ndarray, *, in_chans: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(H, W) in [0, 1] -> (in_chans, H, W) float32, (x - mean) / std per channel."""
    x = np.repeat(np.asarray(x, dtype=np.float32)[None], in_chans, axis=0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)


def preprocess(
    pixels: np.ndarray, *, input_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """(H, W) in [0, 1] -> (in_chans, input_size, input_size) float32, normalised."""
    return normalize(resize(pixels, input_size), in_chans=in_chans, mean=mean, std=std)
