"""Fit what a bundle needs to know what it does not know, on films it was trained and
validated on: the out-of-distribution statistics and threshold, and the uncertainty threshold.

- OOD (Lee et al. 2018): class means and a shared Ledoit-Wolf covariance of the pooled
  features of the *training* films; the threshold is the ``ood_quantile`` (default 0.99)
  quantile of the scores of the *validation* films, so at most about 1% of chest films like
  those are refused.
- Uncertainty: the measure (MC-dropout BALD, MC-dropout predictive entropy, or softmax
  response) with the lowest area under the validation risk-coverage curve, unless one is
  given; the threshold is the ``1 - refer_fraction`` quantile of the validation films'
  values, so ``refer_fraction`` (default 0.2) of them would be referred for review.

The risk-coverage curve (Geifman and El-Yaniv, "Selective Classification for Deep Neural
Networks", NeurIPS 2017) says what that buys: the accuracy of the films kept against the
fraction kept, when films are referred in order of decreasing uncertainty.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from worker.screening.reliability import (
    MC_SAMPLES,
    OOD_METHOD,
    UNCERTAINTY_METHODS,
    OodStats,
    fit_ood,
    uncertainty_of,
)

log = logging.getLogger(__name__)


def risk_coverage(correct: np.ndarray, uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, accuracy of the kept films), keeping films from the most certain down.

    Args:
        correct: (N,) bool, the prediction was right.
        uncertainty: (N,) higher = less sure.
    Returns:
        two (N,) arrays: coverage k/N and the accuracy of the k most certain films, k = 1..N.
    """
    order = np.argsort(uncertainty, kind="stable")
    hits = np.cumsum(np.asarray(correct, dtype=np.float64)[order])
    k = np.arange(1, len(order) + 1)
    return k / len(order), hits / k


def accuracy_at_coverage(correct: np.ndarray, uncertainty: np.ndarray, coverage: float) -> float:
    """The accuracy of the ``coverage`` fraction of films with the lowest uncertainty."""
    cov, acc = risk_coverage(correct, uncertainty)
    return float(acc[max(0, int(np.ceil(coverage * len(cov))) - 1)])


def aurc(correct: np.ndarray, uncertainty: np.ndarray) -> float:
    """Area under the risk (1 - accuracy) - coverage curve; lower is better."""
    _, acc = risk_coverage(correct, uncertainty)
    return float(np.mean(1.0 - acc))


def uncertainty_measures(head, pooled: np.ndarray, probs: np.ndarray, *, temperature: float,
                         bias) -> dict[str, np.ndarray]:
    """Every candidate uncertainty (``UNCERTAINTY_METHODS``) of each film, (N,) each, higher = less sure."""
    import torch

    f = torch.from_numpy(np.asarray(pooled, dtype=np.float32))
    return {m: uncertainty_of(m, head=head, pooled=f, probs=probs, temperature=temperature, bias=bias)
            for m in UNCERTAINTY_METHODS}


def fit_reliability(*, head, train_pooled: np.ndarray, train_y: np.ndarray, val_pooled: np.ndarray,
                    val_y: np.ndarray, val_probs: np.ndarray, temperature: float, bias, num_classes: int,
                    ood_quantile: float = 0.99, refer_fraction: float = 0.2, method: str | None = None,
                    fitted_on: str = "") -> tuple[OodStats, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fit the OOD statistics, choose the uncertainty measure and set both thresholds.

    Args:
        head: the network's head (for the MC-dropout measures).
        train_pooled, train_y: (N, F) pooled features and labels of the training films.
        val_pooled, val_y, val_probs: the same for validation, with its calibrated probabilities.
        method: an uncertainty measure to use; None chooses the one with the lowest validation AURC.
    Returns:
        (OOD statistics, the bundle's ``ood`` metadata, its ``uncertainty`` metadata, a report
        with the validation figures: refused fraction, accuracy at 80% coverage and AURC per measure).
    Raises:
        ValueError: a quantile outside (0, 1), an unknown method, or a class without training films.
    """
    import torch

    if not 0.0 < ood_quantile < 1.0 or not 0.0 <= refer_fraction < 1.0:
        raise ValueError("ood_quantile must be in (0, 1) and refer_fraction in [0, 1)")
    if method is not None and method not in UNCERTAINTY_METHODS:
        raise ValueError(f"unknown uncertainty method {method!r}; use one of {', '.join(UNCERTAINTY_METHODS)}")
    stats = fit_ood(train_pooled, train_y, num_classes)
    val_scores = stats.score(torch.from_numpy(np.asarray(val_pooled, dtype=np.float32)))
    train_scores = stats.score(torch.from_numpy(np.asarray(train_pooled, dtype=np.float32)))
    ood_threshold = float(np.quantile(val_scores, ood_quantile))
    correct = val_probs.argmax(axis=1) == val_y
    measures = uncertainty_measures(head, val_pooled, val_probs, temperature=temperature, bias=bias)
    per_measure = {name: {"aurc": aurc(correct, u), "accuracy_at_80pct_coverage": accuracy_at_coverage(correct, u, 0.8)}
                   for name, u in measures.items()}
    chosen = method or min(per_measure, key=lambda m: per_measure[m]["aurc"])
    u = measures[chosen]
    unc_threshold = float(np.quantile(u, 1.0 - refer_fraction)) if refer_fraction > 0 else float(u.max()) + 1.0
    kept = u < unc_threshold
    ood_meta = {"method": OOD_METHOD, "threshold": ood_threshold, "quantile": ood_quantile,
                "features": int(np.asarray(train_pooled).shape[1]), "fitted_on": fitted_on,
                "n_train": int(len(train_y)), "n_val": int(len(val_y)),
                "val_refused": float(np.mean(val_scores > ood_threshold)),
                "train_median": float(np.median(train_scores)), "val_median": float(np.median(val_scores))}
    unc_meta = {"method": chosen, "samples": MC_SAMPLES, "threshold": unc_threshold,
                "refer_fraction": refer_fraction, "chosen_by": "lowest validation AURC" if method is None else "given",
                "val_accuracy_kept": float(correct[kept].mean()) if kept.any() else None}
    report = {"ood": ood_meta, "uncertainty": unc_meta, "val_accuracy": float(correct.mean()),
              "measures": per_measure}
    log.info("OOD threshold %.1f (val quantile %.2f; train median %.1f, val median %.1f); uncertainty %s "
             "threshold %.4f (%.0f%% of validation referred)", ood_threshold, ood_quantile,
             ood_meta["train_median"], ood_meta["val_median"], chosen, unc_threshold, 100 * refer_fraction)
    return stats, ood_meta, unc_meta, report
