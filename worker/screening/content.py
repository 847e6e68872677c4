"""What the decoded picture itself shows, before the model sees it: is there a radiograph in
it at all (``detail``), and is it a negative (``polarity_score``)? Pure numpy, deterministic.

Both work on a thumbnail, so they cost well under a millisecond after decoding:

- :func:`thumbnail`: the (H, W) image in [0, 1] area-averaged (box filter) to 64 x 64
  (every k-th pixel each way of a large image: at most a few milliseconds).
- :func:`detail`: the spread (5th to 95th percentile) of the thumbnail once a smooth
  quadratic surface is taken away, less the part white noise would explain. A blank,
  uniform, noisy-uniform or gradient-only picture has none; every real film measured has
  at least 0.14 (see README, *Quality gate*).
- :func:`polarity_scores`: the score of the picture as given and that of its best-read
  right-angle rotation (a film sent sideways must not be taken for a negative).
- :func:`polarity_score`: a linear score of the thumbnail's pattern (its 16 x 16 layout and
  its grey-level quantiles, each relative to the image's own mean and spread). Positive:
  displayed as a radiograph is (air and lungs dark, bone bright); negative: inverted. The
  weights (``polarity_weights.py``) were fitted by ``scripts/fit_polarity.py`` on real films
  and their inverted copies (logistic regression, no intercept).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMB = 64  # thumbnail side, pixels
DETAIL_GRID = 32  # the detail measure's grid (area means)
POLARITY_GRID = 16  # the polarity layout's grid
POLARITY_QUANTILES = tuple(float(q) for q in np.linspace(0.05, 0.95, 10))


def _box(pixels: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float64)


#: Images are first subsampled (every k-th pixel each way) to at most about this many pixels
#: on the short side: the area means of a 64 x 64 thumbnail barely change, at a fraction of the cost.
WORK_SIDE = 512


def _subsampled(pixels: np.ndarray) -> np.ndarray:
    step = max(1, min(pixels.shape) // WORK_SIDE)
    return pixels[::step, ::step]


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """(H, W) float image in [0, 1] -> (64, 64) float64 area means (of every k-th pixel each way
    for a large image, see WORK_SIDE). Raises ValueError for a non-2-D array."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {pixels.shape}")
    return _box(_subsampled(pixels), THUMB)


def noise_sigma(pixels: np.ndarray) -> float:
    """Robust per-pixel white-noise estimate (in [0, 1] units): the median absolute difference of
    horizontal neighbours / (0.6745 * sqrt 2), on 64 evenly spaced rows."""
    rows = pixels[:: max(1, pixels.shape[0] // 64)]
    d = np.abs(np.diff(rows.astype(np.float32), axis=1))
    return float(np.median(d)) / (0.6745 * np.sqrt(2.0)) if d.size else 0.0


_g = (np.mgrid[0:DETAIL_GRID, 0:DETAIL_GRID] / (DETAIL_GRID - 1) - 0.5).reshape(2, -1)
_QUADRATIC = np.stack([np.ones(_g.shape[1]), _g[1], _g[0], _g[1] ** 2, _g[0] ** 2, _g[0] * _g[1]], axis=1)


def detail(pixels: np.ndarray, thumb: np.ndarray | None = None) -> float:
    """How much picture there is, in grey levels of [0, 1] (0: none).

    The image's 64 x 64 thumbnail (``thumb`` when already made) is averaged to a 32 x 32
    grid; a least-squares quadratic surface (a gradient, a vignette) is subtracted; the
    5-95 % percentile spread of what remains is reduced by the spread white noise of the
    measured per-pixel sigma would leave on that grid (3.29 sigma / cell side in pixels
    averaged). Shape: (H, W) float in [0, 1] -> float >= 0."""
    h, w = pixels.shape
    if min(h, w) < DETAIL_GRID:
        return float(np.ptp(pixels))
    t = thumbnail(pixels) if thumb is None else thumb
    grid = t.reshape(DETAIL_GRID, 2, DETAIL_GRID, 2).mean(axis=(1, 3))
    coef, *_ = np.linalg.lstsq(_QUADRATIC, grid.ravel(), rcond=None)
    residual = grid.ravel() - _QUADRATIC @ coef
    lo, hi = np.percentile(residual, [5, 95])
    sub = _subsampled(pixels)
    cell = max(1.0, min(sub.shape) / DETAIL_GRID)  # pixels averaged per grid cell, each way
    return max(0.0, float(hi - lo) - 3.29 * noise_sigma(sub) / cell)


def _content_box(thumb: np.ndarray, tol: float = 0.03) -> np.ndarray:
    """The thumbnail without flat bands at its edges (padding around a film placed on a canvas)."""
    rows = np.flatnonzero(thumb.std(axis=1) > tol)
    cols = np.flatnonzero(thumb.std(axis=0) > tol)
    if rows.size < THUMB // 4 or cols.size < THUMB // 4:
        return thumb
    return thumb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def polarity_features(thumb: np.ndarray) -> np.ndarray:
    """(64, 64) thumbnail -> (16*16 + 10,) features: the film's layout and grey-level
    quantiles, each minus the image mean / median and divided by its standard deviation."""
    t = _content_box(thumb).astype(np.float32)
    layout = _box(t, POLARITY_GRID).ravel()
    q = np.quantile(t, POLARITY_QUANTILES)
    sd = float(t.std()) + 1e-3
    return np.concatenate([(layout - t.mean()) / sd, (q - np.median(t)) / sd])


def polarity_score(pixels: np.ndarray, thumb: np.ndarray | None = None) -> float:
    """> 0: a positive film (as radiographs are shown); < 0: a negative. Shape: (H, W) in [0, 1]
    (``thumb``: its :func:`thumbnail`, when already made)."""
    from worker.screening.polarity_weights import WEIGHTS

    t = thumbnail(pixels) if thumb is None else thumb
    return float(polarity_features(t) @ np.asarray(WEIGHTS, dtype=np.float64))


def polarity_scores(pixels: np.ndarray, thumb: np.ndarray | None = None) -> tuple[float, float]:
    """(as given, best rotation): :func:`polarity_score` of the picture as it is, and of whichever
    of its four right-angle rotations scores furthest from 0 (the orientation the weights read
    most surely). The layout weights were fitted on upright films: a positive film sent rotated
    by 90 degrees scores as a negative about as often as not (1,457 of the 5,242 films of the
    default training set), while its upright rotation still reads clearly positive. A film is
    a negative only when both scores say so. Shape: (H, W) in [0, 1]."""
    t = thumbnail(pixels) if thumb is None else thumb
    scores = [polarity_score(pixels, np.ascontiguousarray(np.rot90(t, k))) for k in range(4)]
    return scores[0], max(scores, key=abs)
