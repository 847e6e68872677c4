"""Evaluate a bundle on a labelled set: metrics.json, plots, a Grad-CAM grid, summary.md.

Inference goes through the worker's own Screener inputs (decode -> quality gate ->
preprocess -> infer), with the gate the service runs (the settings' rules, the minimum size
from this bundle), so the numbers describe what the service will do; films the gate refuses
are counted by reason in metrics.json, summary.md and on the console.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cxr import DISCLAIMER  # noqa: E402
from trainer.config import DataConfig  # noqa: E402
from trainer.data import Sample, read_samples, service_gate  # noqa: E402
from trainer.metrics import classification_metrics  # noqa: E402
from worker.screening.decode import ImageDecodeError  # noqa: E402
from worker.screening.explain import gradcam, render_overlay  # noqa: E402
from worker.screening.infer import calibrated  # noqa: E402
from worker.screening.model import LoadedModel, load_bundle  # noqa: E402
from worker.screening.pipeline import ScreenOptions, gated_pixels, to_model  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class GateTally:
    """What the quality gate did to a data set: films refused (by reject code) and inputs
    changed on the way (by note code, e.g. ``polarity_inverted``)."""

    refused: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def add(self, metadata: dict) -> None:
        for note in metadata.get("notes") or []:
            self.notes[note.split(":", 1)[0]] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"n_refused": sum(self.refused.values()), "refused": dict(sorted(self.refused.items())),
                "notes": dict(sorted(self.notes.items()))}

    def sentence(self) -> str:
        refused = ", ".join(f"{c} {n}" for c, n in sorted(self.refused.items())) or "none"
        notes = ", ".join(f"{c} {n}" for c, n in sorted(self.notes.items()))
        return f"{sum(self.refused.values())} refused by the quality gate ({refused})" + (
            f"; changed on the way: {notes}" if notes else "")


def gated_input(data: bytes, loaded: LoadedModel, options: ScreenOptions) -> tuple[np.ndarray, np.ndarray, dict]:
    """bytes -> (pixels, model input, metadata) through the service's gate. Raises ImageDecodeError."""
    pixels, metadata = gated_pixels(data, options)
    return pixels, to_model(pixels, loaded.meta), metadata


def raw_logits(loaded: LoadedModel, samples: list[Sample], *, batch: int = 32,
               tally: GateTally | None = None) -> tuple[np.ndarray, list[Sample]]:
    """The network's logits (before any calibration) for every sample the service's quality
    gate accepts, through the worker's decode, gate and preprocess. Refused films are left
    out, logged, and counted in ``tally``."""
    logits, _, kept = raw_outputs(loaded, samples, batch=batch, tally=tally)
    return logits, kept


def raw_outputs(loaded: LoadedModel, samples: list[Sample], *, batch: int = 32, tally: GateTally | None = None
                ) -> tuple[np.ndarray, np.ndarray, list[Sample]]:
    """(logits (N, K) float64 before calibration, pooled features (N, F) float32, the samples
    the service's quality gate accepts), through the worker's decode, gate and preprocess: one
    pass gives both. Refused films are left out, logged, and counted in ``tally``."""
    options = service_gate(loaded.meta.input_size)
    tally = tally if tally is not None else GateTally()
    out, pooled, kept, xs = [], [], [], []

    def run() -> None:
        with torch.inference_mode():
            f = loaded.model.backbone(torch.from_numpy(np.stack(xs)).to(loaded.device)).float()
            out.append(loaded.model.head(f).float().cpu().numpy())
            pooled.append(f.cpu().numpy())
        xs.clear()

    for s in tqdm(samples, desc="scoring", unit="img", leave=False):
        try:
            _, x, metadata = gated_input(s.path.read_bytes(), loaded, options)
        except ImageDecodeError as e:
            tally.refused[e.code] += 1
            log.warning("skipping %s: %s", s.path.name, e)
            continue
        except OSError as e:
            tally.refused["unreadable"] += 1
            log.warning("skipping %s: cannot be read (%s)", s.path.name, e.strerror)
            continue
        tally.add(metadata)
        xs.append(x)
        kept.append(s)
        if len(xs) == batch:
            run()
    if xs:
        run()
    if tally.refused or tally.notes:
        log.warning("%d films: %s", len(samples), tally.sentence())
    if not kept:
        raise ValueError(f"no labelled image in the data passes the quality gate: {tally.sentence()}")
    return np.concatenate(out).astype(np.float64), np.concatenate(pooled), kept


def reliability_report(loaded: LoadedModel, y: np.ndarray, probs: np.ndarray, pooled: np.ndarray,
                       out: Path | None = None) -> dict[str, Any]:
    """What the bundle knows it does not know, on labelled chest films: the fraction its OOD
    gate would refuse, the fraction marked uncertain, the accuracy of the rest, accuracy at
    80% coverage and the area under the risk-coverage curve per uncertainty measure (MC-dropout
    BALD, 1 - max probability, predictive entropy); ``out``: also draws ``risk_coverage.png``."""
    from trainer.reliability import accuracy_at_coverage, aurc, risk_coverage, uncertainty_measures
    from worker.screening.reliability import SOFTMAX_RESPONSE

    meta = loaded.meta
    f = torch.from_numpy(np.asarray(pooled, dtype=np.float32))
    correct = probs.argmax(axis=1) == y
    measures = uncertainty_measures(loaded.model.head, pooled, probs, temperature=meta.temperature, bias=meta.bias)
    method = meta.uncertainty.get("method") or SOFTMAX_RESPONSE  # a bundle without one: the plain baseline
    report: dict[str, Any] = {"method": method, "measures": {
        name: {"aurc": aurc(correct, u), "accuracy_at_80pct_coverage": accuracy_at_coverage(correct, u, 0.8)}
        for name, u in measures.items()}}
    report["accuracy_at_80pct_coverage"] = report["measures"][method]["accuracy_at_80pct_coverage"]
    unc = measures[method]
    if loaded.ood is not None:
        scores = loaded.ood.score(f)
        report["ood"] = {"threshold": meta.ood_threshold, "refused": float(np.mean(scores > meta.ood_threshold)),
                         "n_refused": int(np.sum(scores > meta.ood_threshold)), "median_score": float(np.median(scores))}
    if meta.uncertainty_threshold is not None:
        unsure = unc >= meta.uncertainty_threshold
        report["uncertain"] = {"threshold": meta.uncertainty_threshold, "fraction": float(unsure.mean()),
                               "accuracy_certain": float(correct[~unsure].mean()) if (~unsure).any() else None,
                               "accuracy_uncertain": float(correct[unsure].mean()) if unsure.any() else None}
    if out is not None:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for name, u in measures.items():
            cov, acc = risk_coverage(correct, u)
            ax.plot(cov, acc, label=f"{name} (AURC {aurc(correct, u):.3f})")
        ax.axvline(0.8, color="grey", lw=0.8, ls=":")
        if "uncertain" in report:
            ax.axvline(1 - report["uncertain"]["fraction"], color="tab:red", lw=0.8, ls="--",
                       label="bundle's threshold")
        ax.set(xlabel="coverage (fraction of films kept)", ylabel="accuracy of the films kept",
               title=f"Risk-coverage (acc @ 80%: {report['accuracy_at_80pct_coverage']:.3f})")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "risk_coverage.png", dpi=120)
        plt.close(fig)
    return report


def score(loaded: LoadedModel, samples: list[Sample], *, batch: int = 32,
          tally: GateTally | None = None) -> tuple[np.ndarray, list[Sample]]:
    """Probabilities for every sample the gate accepts, with the worker's decode, gate,
    preprocess and calibration (softmax(logits / T + offsets), as Screener computes them)."""
    logits, kept = raw_logits(loaded, samples, batch=batch, tally=tally)
    return calibrated(torch.from_numpy(logits), temperature=loaded.meta.temperature, bias=loaded.meta.bias), kept


def evaluate(checkpoint: Path, data: DataConfig, out: Path, *, bootstrap: int = 1000, cam_per_class: int = 3) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_bundle(checkpoint)
    classes = loaded.meta.classes
    samples = read_samples(data, classes)
    tally = GateTally()
    logits, pooled, kept = raw_outputs(loaded, samples, tally=tally)
    probs = calibrated(torch.from_numpy(logits), temperature=loaded.meta.temperature, bias=loaded.meta.bias)
    y = np.array([s.label for s in kept])
    metrics = classification_metrics(y, probs, classes, thresholds=loaded.meta.thresholds or None,
                                     bootstrap=bootstrap)
    metrics["checkpoint"] = {"path": str(checkpoint), "sha256": loaded.sha256, "version": loaded.meta.version,
                             "architecture": loaded.meta.architecture, "temperature": loaded.meta.temperature,
                             "logit_bias": loaded.meta.bias}
    metrics["data"] = {"source": data.source, "n_listed": len(samples), "n_scored": len(kept),
                       "gate": {"min_size": service_gate(loaded.meta.input_size).gate.effective_min_size,
                                **tally.as_dict()}}
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(kept):
        by_source[s.source].append(i)
    metrics["per_source"] = {
        src: classification_metrics(y[idx], probs[idx], classes, thresholds=loaded.meta.thresholds or None,
                                    bootstrap=0)
        for src, idx in sorted(by_source.items())
    }
    for src, idx in by_source.items():
        metrics["per_source"][src]["pairwise_auc"] = pairwise_auc(y[idx], probs[idx], classes)
    metrics["reliability"] = reliability_report(loaded, y, probs, pooled, out)
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
    (out / "predictions.csv").write_text(
        "path,label,source," + ",".join(f"p_{c}" for c in classes) + "\n"
        + "".join(f"{s.path},{classes[s.label]},{s.source}," + ",".join(f"{p:.6f}" for p in probs[i]) + "\n"
                  for i, s in enumerate(kept)))
    plot_roc(y, probs, classes, metrics, out / "roc.png")
    plot_confusion(np.array(metrics["confusion_matrix"]), classes, out / "confusion.png")
    plot_calibration(y, probs, out / "calibration.png", metrics["ece"])
    gradcam_grid(loaded, kept, y, probs, out / "gradcam_grid.png", per_class=cam_per_class)
    (out / "summary.md").write_text(summary_markdown(metrics, classes))
    return metrics


def pairwise_auc(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    """For each pair of classes (a, b) both present: the AUC of P(b) separating b's films from
    a's, e.g. ``"Normal vs Pneumonia"`` within one hospital's films (CheXNet's comparison)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            if j <= i:
                continue
            keep = (y == i) | (y == j)
            if (y[keep] == i).any() and (y[keep] == j).any():
                out[f"{a} vs {b}"] = float(roc_auc_score(y[keep] == j, probs[keep, j]))
    return out


def json_safe(value: Any) -> Any:
    """NaN (an AUC with one class absent) becomes null: metrics.json stays strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def plot_roc(y, probs, classes, metrics, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(classes):
        if (y == c).any() and (y != c).any():
            fpr, tpr, _ = roc_curve(y == c, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {metrics['per_class'][name]['auc']:.3f})")
    for name, op in (metrics.get("operating_points") or {}).items():
        ax.plot(1 - op["specificity"], op["sensitivity"], "o", color="black")
        ax.annotate(f"{name} op", (1 - op["specificity"], op["sensitivity"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=8)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, one vs rest (macro AUC {metrics['macro_auc']:.3f})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history: list[dict[str, Any]], path: Path, *, head_epochs: int = 0) -> None:
    """Training loss and validation macro AUC / accuracy per epoch; the kept epoch is marked."""
    epochs = [h["epoch"] for h in history]
    auc = [h["val_macro_auc"] for h in history]
    acc = [h["val_accuracy"] for h in history]
    best = epochs[int(np.argmax(auc))]
    fig, loss_ax = plt.subplots(figsize=(6.5, 4))
    if head_epochs:
        loss_ax.axvspan(0.5, head_epochs + 0.5, color="0.92", label="head only")
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", color="tab:grey", label="train loss")
    loss_ax.set(xlabel="epoch", ylabel="train loss (label-smoothed CE)")
    val_ax = loss_ax.twinx()
    val_ax.plot(epochs, auc, "o-", color="tab:blue", label="val macro AUC")
    val_ax.plot(epochs, acc, "s--", color="tab:orange", label="val accuracy")
    val_ax.axvline(best, color="tab:blue", lw=0.8, ls=":")
    val_ax.annotate(f"kept: epoch {best}", (best, max(auc)), textcoords="offset points", xytext=(4, 6), fontsize=8)
    val_ax.set(ylabel="validation", ylim=(max(0.0, min(auc + acc) - 0.05), 1.0))
    handles = [h for ax in (loss_ax, val_ax) for h in ax.get_legend_handles_labels()[0]]
    val_ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    loss_ax.set_title("Training history")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, classes, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_calibration(y, probs, path: Path, ece_value: float, bins: int = 10) -> None:
    conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == y)
    edges = np.linspace(0, 1, bins + 1)
    mids, accs, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            mids.append(conf[m].mean())
            accs.append(correct[m].mean())
            counts.append(m.sum())
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8, label="perfect calibration")
    ax.plot(mids, accs, "o-", label="model")
    for x, a, n in zip(mids, accs, counts):
        ax.annotate(str(n), (x, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability diagram (ECE {ece_value:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gradcam_grid(loaded: LoadedModel, samples, y, probs, path: Path, *, per_class: int) -> None:
    """For each class: the most confident correct cases and the most confident wrong ones."""
    classes = loaded.meta.classes
    options = service_gate(loaded.meta.input_size)
    pred = probs.argmax(axis=1)
    rows = []
    for c, name in enumerate(classes):
        right = [i for i in np.argsort(-probs[:, c]) if y[i] == c and pred[i] == c][:per_class]
        wrong = [i for i in np.argsort(-probs.max(axis=1)) if y[i] == c and pred[i] != c][:per_class]
        rows.append((name, right, wrong))
    cols = 2 * per_class
    fig, axes = plt.subplots(len(classes), cols, figsize=(2.2 * cols, 2.5 * len(classes)), squeeze=False)
    for r, (name, right, wrong) in enumerate(rows):
        for k in range(cols):
            ax = axes[r][k]
            ax.axis("off")
            group, j = (right, k) if k < per_class else (wrong, k - per_class)
            if j >= len(group):
                continue
            i = group[j]
            pixels, x, _ = gated_input(samples[i].path.read_bytes(), loaded, options)
            cam = gradcam(loaded.model, x, target_class=int(pred[i]))
            ax.imshow(np.asarray(render_overlay(pixels, cam)))
            ok = "correct" if group is right else "WRONG"
            ax.set_title(f"{name}: {ok}\npred {classes[pred[i]]} {probs[i].max():.2f}", fontsize=7,
                         color="black" if group is right else "red")
    fig.suptitle("Grad-CAM: where the model looks (left: correct, right: wrong). " + DISCLAIMER, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_ci(ci: list[float] | None) -> str:
    return f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else ""


def summary_markdown(m: dict[str, Any], classes: list[str]) -> str:
    gate = m["data"].get("gate") or {}
    lines = [
        "# Evaluation summary", "",
        f"> {DISCLAIMER}", "",
        f"- checkpoint: `{m['checkpoint']['path']}` (sha256 `{m['checkpoint']['sha256'][:12]}`, "
        f"{m['checkpoint']['architecture']}, temperature {m['checkpoint']['temperature']:.3f}, "
        f"logit offsets {', '.join(f'{b:+.3f}' for b in m['checkpoint'].get('logit_bias') or [])})",
        f"- data: `{m['data']['source']}`, {m['data']['n_scored']} images scored of {m['data']['n_listed']}",
        f"- quality gate (as the service runs it; shortest side {gate.get('min_size')} px): "
        f"{gate.get('n_refused', 0)} refused"
        + (" (" + ", ".join(f"`{c}` {n}" for c, n in gate.get("refused", {}).items()) + ")"
           if gate.get("refused") else "")
        + ("; " + ", ".join(f"`{c}` {n}" for c, n in gate.get("notes", {}).items()) if gate.get("notes") else ""),
        "",
        "| metric | value |", "|---|---|",
        f"| accuracy | {m['accuracy']:.3f} |",
        f"| macro AUC (95% CI) | {m['macro_auc']:.3f}{fmt_ci(m.get('macro_auc_ci95'))} |",
        f"| ECE | {m['ece']:.3f} |", "",
        "| class | precision | recall | F1 | AUC (95% CI) | support |", "|---|---|---|---|---|---|",
    ]
    for c in classes:
        p = m["per_class"][c]
        lines.append(f"| {c} | {p['precision']:.3f} | {p['recall']:.3f} | {p['f1']:.3f} | "
                     f"{p['auc']:.3f}{fmt_ci(p.get('auc_ci95'))} | {p['support']} |")
    if m.get("operating_points"):
        lines += ["", "| operating point | threshold | sensitivity | specificity |", "|---|---|---|---|"]
        for c, op in m["operating_points"].items():
            lines.append(f"| {c} | {op['threshold']:.3f} | {op['sensitivity']:.3f} | {op['specificity']:.3f} |")
    per_class_cols = list(classes)
    op_cols = list(m.get("operating_points") or {})
    lines += ["", "## Per source", "", "Recall per class is the sensitivity for that class among the source's films "
              "of it (a source that brings one class only, such as TBX11K's TB, is judged by that recall).", "",
              "| source | n | accuracy | macro AUC | " + " | ".join(f"{c} recall (n)" for c in per_class_cols)
              + "".join(f" | {c} sensitivity at its operating point" for c in op_cols) + " |",
              "|---|---|---|---|" + "---|" * (len(per_class_cols) + len(op_cols))]
    for src, sm in m["per_source"].items():
        auc = sm["macro_auc"]
        recalls = [(f"{sm['per_class'][c]['recall']:.3f} ({sm['per_class'][c]['support']})"
                    if sm["per_class"][c]["support"] else "-") for c in per_class_cols]
        sens = [sm.get("operating_points", {}).get(c, {}).get("sensitivity") for c in op_cols]
        lines.append(f"| {src} | {sm['n']} | {sm['accuracy']:.3f} | {'-' if auc is None or auc != auc else f'{auc:.3f}'} | "
                     + " | ".join(recalls)
                     + "".join(f" | {'-' if v is None or v != v else f'{v:.3f}'}" for v in sens) + " |")
    pairs = [(src, name, v) for src, sm in m["per_source"].items() for name, v in (sm.get("pairwise_auc") or {}).items()]
    if pairs:
        lines += ["", "| source | classes | AUC within the source |", "|---|---|---|"]
        lines += [f"| {src} | {name} | {v:.3f} |" for src, name, v in pairs]
    rel = m.get("reliability") or {}
    if rel:
        lines += ["", "## What the model knows it does not know", "",
                  f"- accuracy at 80% coverage (refer the 20% most uncertain by {rel['method']}): "
                  f"**{rel['accuracy_at_80pct_coverage']:.3f}**"]
        if "uncertain" in rel:
            u = rel["uncertain"]
            lines.append(f"- marked uncertain at the bundle's threshold ({u['threshold']:.4f}): "
                         f"{u['fraction']:.1%}; accuracy of the others {u['accuracy_certain'] or float('nan'):.3f}")
        if "ood" in rel:
            lines.append(f"- refused by the out-of-distribution gate (threshold {rel['ood']['threshold']:.1f}): "
                         f"{rel['ood']['n_refused']} films ({rel['ood']['refused']:.1%}) of these chest films")
        lines += ["", "| uncertainty measure | AURC (lower is better) | accuracy at 80% coverage |", "|---|---|---|"]
        for name, v in rel["measures"].items():
            lines.append(f"| {name} | {v['aurc']:.4f} | {v['accuracy_at_80pct_coverage']:.3f} |")
        lines += ["", "![Risk-coverage](risk_coverage.png)"]
    lines += ["", "![ROC](roc.png) ![Confusion](confusion.png) ![Calibration](calibration.png)", "",
              "![Grad-CAM](gradcam_grid.png)", ""]
    return "\n".join(lines)
