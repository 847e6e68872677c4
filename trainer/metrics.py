"""Classification metrics for screening: AUCs with bootstrap CIs, calibration, operating points."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score


def ece(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-label confidence, equal-width bins."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total)


def ovr_auc(y: np.ndarray, scores: np.ndarray, c: int) -> float:
    pos = y == c
    if pos.all() or not pos.any():
        return float("nan")
    return float(roc_auc_score(pos, scores[:, c]))


def bootstrap_auc_ci(y: np.ndarray, probs: np.ndarray, n_classes: int, *, n: int, seed: int = 0) -> dict[str, Any]:
    """95% percentile bootstrap intervals for each class's one-vs-rest AUC and the macro AUC."""
    rng = np.random.default_rng(seed)
    per_class: list[list[float]] = [[] for _ in range(n_classes)]
    macro: list[float] = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        yb, pb = y[idx], probs[idx]
        aucs = [ovr_auc(yb, pb, c) for c in range(n_classes)]
        if any(np.isnan(aucs)):
            continue
        for c, a in enumerate(aucs):
            per_class[c].append(a)
        macro.append(float(np.mean(aucs)))

    def ci(v: list[float]) -> list[float] | None:
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None

    return {"per_class": [ci(v) for v in per_class], "macro": ci(macro)}


def classification_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    thresholds: dict[str, float] | None = None,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    y = np.asarray(y)
    pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    aucs = [ovr_auc(y, probs, c) for c in labels]
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "macro_auc": float(np.nanmean(aucs)) if not all(np.isnan(aucs)) else float("nan"),
        "ece": ece(y, probs),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "per_class": {
            c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "auc": aucs[i],
                "support": int(support[i])}
            for i, c in enumerate(classes)
        },
    }
    if bootstrap:
        cis = bootstrap_auc_ci(y, probs, len(classes), n=bootstrap)
        out["macro_auc_ci95"] = cis["macro"]
        for i, c in enumerate(classes):
            out["per_class"][c]["auc_ci95"] = cis["per_class"][i]
    if thresholds:
        ops = {}
        for cls, t in thresholds.items():
            c = classes.index(cls)
            pos, flagged = y == c, probs[:, c] >= t
            ops[cls] = {
                "threshold": float(t),
                "sensitivity": float(flagged[pos].mean()) if pos.any() else float("nan"),
                "specificity": float((~flagged[~pos]).mean()) if (~pos).any() else float("nan"),
            }
        out["operating_points"] = ops
    return out
