"""Post-training calibration on the validation split: a temperature and per-class logit
offsets, and per-class operating points (thresholds) that reach a target sensitivity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax

METHODS = ("temperature", "temperature+bias")


def _scaled(logits: np.ndarray, temperature: float, bias: Sequence[float] | None) -> np.ndarray:
    return logits / temperature + (np.asarray(bias, dtype=np.float64) if bias is not None else 0.0)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float, bias: Sequence[float] | None = None) -> float:
    return float(-log_softmax(_scaled(logits, temperature, bias), axis=1)[np.arange(len(y)), y].mean())


def calibrated_probs(logits: np.ndarray, temperature: float, bias: Sequence[float] | None = None) -> np.ndarray:
    """softmax(logits / temperature + bias): what the worker computes from a bundle."""
    return softmax(_scaled(logits, temperature, bias), axis=1)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation negative log-likelihood (Guo et al., 2017)."""
    res = minimize_scalar(lambda log_t: nll(logits, y, math.exp(log_t)), bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(res.x))


def fit_temperature_and_bias(logits: np.ndarray, y: np.ndarray) -> tuple[float, list[float]]:
    """A temperature and one logit offset per class (the first fixed at 0) minimising
    validation negative log-likelihood: bias-corrected temperature scaling (Alexandari et al.,
    ICML 2020). Class-weighted training shifts the model's class priors; a temperature only
    rescales confidence, the offsets move the priors back. Ranking (AUC) is unchanged."""
    k = logits.shape[1]

    def loss(params: np.ndarray) -> float:
        return nll(logits, y, math.exp(params[0]), np.concatenate([[0.0], params[1:]]))

    start = np.concatenate([[math.log(fit_temperature(logits, y))], np.zeros(k - 1)])
    res = minimize(loss, start, method="L-BFGS-B", bounds=[(-3.0, 3.0)] + [(-10.0, 10.0)] * (k - 1))
    if not res.success or loss(res.x) > loss(start):  # never worse than the temperature alone
        return float(math.exp(start[0])), [0.0] * k
    return float(math.exp(res.x[0])), [0.0, *(float(b) for b in res.x[1:])]


def fit_calibration(logits: np.ndarray, y: np.ndarray, method: str) -> tuple[float, list[float]]:
    """(temperature, logit offsets) by ``method``: "temperature" or "temperature+bias"."""
    if method == "temperature":
        return fit_temperature(logits, y), [0.0] * logits.shape[1]
    if method == "temperature+bias":
        return fit_temperature_and_bias(logits, y)
    raise ValueError(f"unknown calibration {method!r}; use one of {', '.join(METHODS)}")


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
