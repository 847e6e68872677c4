"""The training loop: readable in one sitting.

decode+resize once (worker code) -> split by patient/group -> head-only epochs -> full
fine-tune with AdamW + warm-up/cosine (+ optional mixup and weight EMA) -> early stopping
on validation macro AUC -> temperature + logit offsets + operating points on validation ->
bundle (worker's save_bundle).
"""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxr.bundle import BundleMeta
from trainer.calibrate import calibrated_probs, fit_calibration, thresholds_for_sensitivity
from trainer.config import OFFLINE, TrainConfig, save_config
from trainer.data import CachedImages, Sample, fingerprint, load_images, read_samples, split_by_group
from trainer.evaluate import plot_history
from trainer.metrics import classification_metrics
from worker.screening.model import CxrNet, build_model, load_bundle, save_bundle

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def make_meta(cfg: TrainConfig) -> BundleMeta:
    return BundleMeta(architecture=cfg.architecture, classes=list(cfg.classes), input_size=cfg.input_size,
                      in_chans=cfg.in_chans, mean=list(cfg.mean), std=list(cfg.std),
                      version=cfg.version or time.strftime("%Y%m%d-%H%M%S"))


def init_model(cfg: TrainConfig, meta: BundleMeta) -> CxrNet:
    model = build_model(meta, pretrained=cfg.pretrained == "hub")
    if cfg.pretrained in OFFLINE:
        from trainer.pretrained import load_offline_backbone

        load_offline_backbone(model.backbone, cfg.architecture, cfg.in_chans)
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    model.eval()
    out = []
    for x, _ in loader:
        x = x.to(device, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def mix(x: torch.Tensor, alpha: float, rng: np.random.Generator) -> tuple[float, torch.Tensor | None]:
    """mixup (Zhang et al. 2018): a weight lam ~ Beta(alpha, alpha) and a partner for each film.

    The batch becomes lam * x + (1 - lam) * x[partner], and the loss the same mix of the two
    labels' losses. alpha 0 turns it off (partner None).
    """
    if alpha <= 0 or len(x) < 2:
        return 1.0, None
    return float(rng.beta(alpha, alpha)), torch.randperm(len(x), device=x.device)


def set_backbone_trainable(model: CxrNet, trainable: bool) -> None:
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)


def train(cfg: TrainConfig, *, resume: Path | None = None) -> Path:
    """Train, calibrate and write ``<out>/model.safetensors`` (+ config, splits, metrics)."""
    seed_everything(cfg.seed)
    commit = git_commit()  # the code this run starts from (HEAD may move while it trains)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    samples = read_samples(cfg.data, cfg.classes)
    splits = split_by_group(samples, val=cfg.data.val_fraction, test=cfg.data.test_fraction, seed=cfg.seed)
    write_split(out / "splits.csv", splits, cfg.classes)
    log.info("data: %d images (%s) -> train %d / val %d / test %d (split by group, never by image)",
             len(samples), cfg.data.source, *(len(splits[k]) for k in ("train", "val", "test")))
    tr_x, tr_s = load_images(splits["train"], cfg.input_size, desc="decode train")
    va_x, va_s = load_images(splits["val"], cfg.input_size, desc="decode val")
    tr_y, va_y = [s.label for s in tr_s], [s.label for s in va_s]

    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(CachedImages(tr_x, tr_y, cfg, augment=True), batch_size=cfg.batch_size,
                              shuffle=True, drop_last=len(tr_y) > cfg.batch_size, generator=g)
    val_loader = DataLoader(CachedImages(va_x, va_y, cfg, augment=False), batch_size=64)

    meta = make_meta(cfg)
    model = init_model(cfg, meta)
    start_epoch, best_auc, best_state, history = 0, -1.0, None, []
    if resume is not None:
        state = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        start_epoch, best_auc, history = state["epoch"] + 1, state["best_auc"], state["history"]
        best_state = state["best_model"]
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    model.to(device, memory_format=torch.channels_last)
    # An exponential moving average of the weights (timm's ModelEmaV3, decay warmed up from 0):
    # validation, early stopping and the bundle use the average, which swings less per epoch.
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay else None
    if ema is not None and resume is not None and state.get("ema") is not None:
        ema.module.load_state_dict(state["ema"])  # else the average starts from the resumed weights
    scored = ema.module if ema is not None else model

    counts = np.bincount(tr_y, minlength=len(cfg.classes)).astype(np.float64)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1)) if cfg.class_weights else np.ones(len(counts))
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device),
                                  label_smoothing=cfg.label_smoothing)
    opt = torch.optim.AdamW([
        {"params": model.head.parameters(), "lr": cfg.lr},
        {"params": model.backbone.parameters(), "lr": cfg.backbone_lr},
    ], weight_decay=cfg.weight_decay)
    base_lrs = [cfg.lr, cfg.backbone_lr]
    steps_per_epoch = len(train_loader)
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if resume is not None:
        opt.load_state_dict(state["optimizer"])

    stale, rng = 0, np.random.default_rng(cfg.seed)
    for epoch in range(start_epoch, cfg.epochs):
        head_only = epoch < cfg.head_epochs
        set_backbone_trainable(model, not head_only)
        model.train()
        if head_only:
            model.backbone.eval()  # keep ImageNet BN statistics while only the head learns
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}{' (head)' if head_only else ''}",
                   unit="batch", leave=False)
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * lr_factor(step, warmup=warmup_steps, total=total_steps)
            x = x.to(device, memory_format=torch.channels_last)
            y = y.to(device)
            lam, partner = mix(x, cfg.mixup_alpha, rng)
            if partner is not None:
                x = lam * x + (1 - lam) * x[partner]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x).float()
                loss = loss_fn(logits, y)
                if partner is not None:
                    loss = lam * loss + (1 - lam) * loss_fn(logits, y[partner])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(model, step=step)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        elapsed = time.perf_counter() - t0
        val_probs = calibrated_probs(predict_logits(scored, val_loader, device), 1.0)
        m = classification_metrics(np.array(va_y), val_probs, cfg.classes, bootstrap=0)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "val_macro_auc": m["macro_auc"],
                        "val_accuracy": m["accuracy"], "images_per_s": seen / elapsed})
        log.info("epoch %d/%d%s loss %.4f | val macro AUC %.4f acc %.4f | %.1f img/s", epoch + 1, cfg.epochs,
                 " (head)" if head_only else "", loss_sum / seen, m["macro_auc"], m["accuracy"], seen / elapsed)
        if m["macro_auc"] > best_auc:
            best_auc, stale = m["macro_auc"], 0
            best_state = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
        else:
            stale += 1
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                    "best_auc": best_auc, "best_model": best_state, "history": history,
                    "ema": ema.module.state_dict() if ema is not None else None}, out / "last.pt")
        if stale >= cfg.patience and not head_only:
            log.info("early stopping: no validation AUC gain for %d epochs", stale)
            break

    model.load_state_dict(best_state)
    val_logits = predict_logits(model, val_loader, device)
    temperature, bias = fit_calibration(val_logits, np.array(va_y), cfg.calibration)
    val_probs = calibrated_probs(val_logits, temperature, bias)
    thresholds = thresholds_for_sensitivity(np.array(va_y), val_probs, cfg.classes, cfg.target_sensitivity)
    val_metrics = classification_metrics(np.array(va_y), val_probs, cfg.classes, thresholds=thresholds, bootstrap=0)
    meta = replace(meta, temperature=temperature, logit_bias=bias, thresholds=thresholds, extra={
        "train_config": cfg.to_dict(),
        "data_fingerprint": fingerprint(samples, cfg.classes),
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "val_metrics": summary_metrics(val_metrics),
        "history": history,
        "git_commit": commit,
    })
    bundle = save_bundle(out / "model.safetensors", model.cpu(), meta, half=cfg.half_weights)
    (out / "val_metrics.json").write_text(json.dumps(val_metrics, indent=2))
    plot_history(history, out / "history.png", head_epochs=min(cfg.head_epochs, cfg.epochs))
    log.info("wrote %s (temperature %.3f, logit offsets %s, thresholds %s, val macro AUC %.4f)", bundle,
             temperature, [round(b, 3) for b in bias], thresholds, val_metrics["macro_auc"])
    if cfg.half_weights:
        load_bundle(bundle)  # the fp16 bundle must load back into the worker's network
    return bundle


def summary_metrics(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("accuracy", "macro_auc", "ece", "n")
    return {k: m[k] for k in keep if k in m} | {"per_class_auc": {c: v["auc"] for c, v in m["per_class"].items()}}


def write_split(path: Path, splits: dict[str, list[Sample]], classes: list[str]) -> None:
    """One CSV per run listing every image's split, and <split>.csv files usable as evaluation input."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group", "source", "split"])
        for name, items in splits.items():
            for s in items:
                w.writerow([s.path, classes[s.label], s.group, s.source, name])
    for name, items in splits.items():
        with (path.parent / f"{name}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "patient_id", "source"])
            for s in items:
                w.writerow([s.path, classes[s.label], s.group, s.source])
