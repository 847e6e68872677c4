"""Post-training calibration on the validation split: a temperature, and per-class
operating points (thresholds) that reach a target sensitivity."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation negative log-likelihood (Guo et al., 2017)."""
    res = minimize_scalar(lambda log_t: nll(logits, y, math.exp(log_t)), bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(res.x))


def threshold_for_sensitivity(scores_pos: np.ndarray, target: float) -> float:
    """The highest threshold t with mean(scores_pos >= t) >= target."""
    if len(scores_pos) == 0:
        raise ValueError("no positive cases to set an operating point on")
    ranked = np.sort(scores_pos)[::-1]
    k = max(1, math.ceil(target * len(ranked) - 1e-9))
    return float(ranked[k - 1])


def thresholds_for_sensitivity(
    y: np.ndarray, probs: np.ndarray, classes: list[str], targets: dict[str, float]
) -> dict[str, float]:
    out = {}
    for cls, target in targets.items():
        c = classes.index(cls)
        out[cls] = threshold_for_sensitivity(probs[y == c, c], target)
    return out
