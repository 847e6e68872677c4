"""Turn a decoded grey image into the model's input tensor, as the bundle prescribes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a float image to size x size (the whole film, no crop)."""
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))  # float32 -> mode "F"
    out = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def preprocess(
    pixels: np.ndarray, *, input_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """(H, W) in [0, 1] -> (in_chans, input_size, input_size) float32, normalised."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {pixels.shape}")
    x = resize(pixels, input_size)
    x = np.repeat(x[None], in_chans, axis=0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)
