"""Calibrate a trained bundle again on a labelled set, without retraining.

A screening programme whose population differs from the training data (another prevalence,
other scanners) refits the calibration (temperature and per-class logit offsets) and the
operating points on a validation set of its own. The weights are kept bit for bit; only
the bundle's metadata changes, so the result is a new model version with the same network.

With training films (``ood_fit``) it also fits what the bundle needs to know what it does
not know (``trainer/reliability.py``): out-of-distribution statistics of those films' pooled
features, and the OOD and uncertainty thresholds on the calibration data.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from cxr.bundle import META_KEY
from trainer.calibrate import calibrated_probs, fit_calibration, nll, thresholds_for_sensitivity
from trainer.config import DataConfig
from trainer.data import read_samples
from trainer.evaluate import raw_outputs
from trainer.metrics import classification_metrics
from worker.screening.model import load_bundle
from worker.screening.reliability import OOD_PREFIX

log = logging.getLogger(__name__)


def recalibrate(checkpoint: Path, data: DataConfig, out: Path, *, method: str = "temperature+bias",
                targets: dict[str, float] | None = None, ood_fit: DataConfig | None = None,
                ood_quantile: float = 0.99, refer_fraction: float = 0.2,
                uncertainty_method: str | None = None) -> dict:
    """Fit calibration and operating points on ``data`` and write ``out``: the same weights
    with the new metadata. ``targets``: per-class sensitivity for the operating points
    (default: those the bundle was trained with, else Tuberculosis 0.90).

    ``ood_fit``: the films the network was trained on; when given, the OOD statistics are
    fitted on them, the OOD threshold at the ``ood_quantile`` of ``data``'s scores and the
    uncertainty threshold so that ``refer_fraction`` of ``data`` is uncertain.

    Returns what changed: the old and new temperature, offsets, thresholds, and the
    negative log-likelihood, accuracy and ECE on ``data`` before and after (and, with
    ``ood_fit``, the reliability report of ``trainer.reliability.fit_reliability``)."""
    loaded = load_bundle(checkpoint)
    meta = loaded.meta
    classes = meta.classes
    if targets is None:
        targets = (meta.extra.get("train_config") or {}).get("target_sensitivity") or {"Tuberculosis": 0.90}
    unknown = set(targets) - set(classes)
    if unknown:
        raise ValueError(f"no such class in the bundle: {sorted(unknown)}; its classes are {classes}")
    logits, pooled, kept = raw_outputs(loaded, read_samples(data, classes))
    y = np.array([s.label for s in kept])
    missing = [c for c in targets if not (y == classes.index(c)).any()]
    if missing:
        raise ValueError(f"the calibration data has no {', '.join(missing)} case to set an operating point on")
    temperature, bias = fit_calibration(logits, y, method)
    probs = calibrated_probs(logits, temperature, bias)
    thresholds = thresholds_for_sensitivity(y, probs, classes, targets)
    before = classification_metrics(y, calibrated_probs(logits, meta.temperature, meta.bias), classes, bootstrap=0)
    after = classification_metrics(y, probs, classes, thresholds=thresholds, bootstrap=0)
    ood_stats, reliability, knows = None, None, {}
    if ood_fit is not None:
        from trainer.reliability import fit_reliability
        _, train_pooled, train_kept = raw_outputs(loaded, read_samples(ood_fit, classes))
        ood_stats, ood_meta, unc_meta, reliability = fit_reliability(
            head=loaded.model.head, train_pooled=train_pooled, train_y=np.array([s.label for s in train_kept]),
            val_pooled=pooled, val_y=y, val_probs=probs, temperature=temperature, bias=bias,
            num_classes=len(classes), ood_quantile=ood_quantile, refer_fraction=refer_fraction,
            method=uncertainty_method, fitted_on=str(ood_fit.source))
        knows = {"ood": ood_meta, "uncertainty": unc_meta}
    new_meta = replace(
        meta, temperature=temperature, logit_bias=bias, thresholds=thresholds,
        version=f"{meta.version}-cal{datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S')}",
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **knows,
        extra={**meta.extra, "calibration": {
            "method": method, "data": str(data.source), "n": len(kept), "targets": targets,
            "from_version": meta.version, "from_sha256": loaded.sha256,
            "metrics": {"accuracy": after["accuracy"], "ece": after["ece"], "macro_auc": after["macro_auc"]},
        }},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tensors = load_file(str(checkpoint))  # weights as stored
    if ood_stats is not None:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(OOD_PREFIX)} | ood_stats.tensors()
    save_file(tensors, str(tmp), metadata={META_KEY: new_meta.to_json()})
    tmp.replace(out)
    load_bundle(out)  # it must load back into the worker's network
    return {
        "n": len(kept), "method": method,
        "temperature": [meta.temperature, temperature], "logit_bias": [meta.bias, bias],
        "thresholds": [meta.thresholds, thresholds],
        "nll": [nll(logits, y, meta.temperature, meta.bias), nll(logits, y, temperature, bias)],
        "accuracy": [before["accuracy"], after["accuracy"]], "ece": [before["ece"], after["ece"]],
        "version": new_meta.version,
        "reliability": reliability,
    }
