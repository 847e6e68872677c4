"""Training data: read a CSV or class folders, split by patient/group, decode with the
worker's own decode, quality gate and resize, augment, normalise with the worker's own normalize."""

from __future__ import annotations

import csv
import hashlib
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from trainer.config import AugmentConfig, DataConfig, TrainConfig
from worker.screening.decode import ImageDecodeError
from worker.screening.preprocess import normalize, resize

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    group: str
    source: str


def match_class(label: str, classes: list[str]) -> int:
    for i, c in enumerate(classes):
        if label.strip().lower() == c.lower():
            return i
    raise ValueError(f"label {label!r} is not one of {classes}")


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def read_samples(cfg: DataConfig, classes: list[str]) -> list[Sample]:
    """Rows from a CSV, or files from class folders. Rows sharing any group value (a patient
    id, a duplicate cluster) end up in one group, so a split never separates them."""
    src = Path(cfg.source)
    if src.is_dir():
        out = []
        for i, c in enumerate(classes):
            folder = next((d for d in src.iterdir() if d.is_dir() and d.name.lower() == c.lower()), None)
            if folder is None:
                raise FileNotFoundError(f"{src} has no folder for class {c!r} (expected {src}/{c}/)")
            for f in sorted(folder.rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    out.append(Sample(path=f, label=i, group=f"file:{f.name}", source=src.name))
        return out
    rows = list(csv.DictReader(src.open(newline="")))
    uf = _UnionFind()
    for r in rows:
        node = f"file:{r[cfg.path_column]}"
        uf.find(node)
        for col in cfg.group_columns:
            if r.get(col):
                uf.union(node, f"{col}:{r[col]}")
        for col, target in cfg.link_columns.items():
            if r.get(target):
                uf.union(node, f"{target}:{r[target]}")
            if r.get(col):
                uf.union(node, f"{target}:{r[col]}")
    return [
        Sample(
            path=(src.parent / r[cfg.path_column]).resolve(),
            label=match_class(r[cfg.label_column], classes),
            group=uf.find(f"file:{r[cfg.path_column]}"),
            source=r.get(cfg.source_column) or "unknown",
        )
        for r in rows
    ]


def split_by_group(samples: list[Sample], *, val: float, test: float, seed: int) -> dict[str, list[Sample]]:
    """Stratified (by each group's majority label) random split of whole groups."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    by_label: dict[int, list[str]] = defaultdict(list)
    for g, members in sorted(groups.items()):
        by_label[max({m.label for m in members}, key=[m.label for m in members].count)].append(g)
    rng = random.Random(seed)
    out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for label in sorted(by_label):
        gs = by_label[label]
        rng.shuffle(gs)
        n_test, n_val = round(len(gs) * test), round(len(gs) * val)
        for i, g in enumerate(gs):
            part = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            out[part] += groups[g]
    return out


def fingerprint(samples: list[Sample], classes: list[str]) -> str:
    """sha256 of the sorted (file name, label) list: identifies the data a model saw."""
    h = hashlib.sha256()
    for line in sorted(f"{s.path.name}\t{classes[s.label]}" for s in samples):
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def service_gate(input_size: int):
    """The service's screening options (the CXR_* settings' gate rules) for a model of this input
    size: what the trainer and ``cxr evaluate`` gate with, so they and the service agree."""
    from cxr.settings import get_settings
    from worker.service import screen_options

    return screen_options(get_settings()).for_input_size(input_size)


def load_images(samples: list[Sample], size: int, *, desc: str) -> tuple[np.ndarray, list[Sample]]:
    """Decode, gate and resize every sample once, with the worker's own code and the gate the
    service runs for a model of input ``size`` (so the model is trained on nothing the service
    would refuse, and a negative PNG/JPEG is inverted as the service inverts it). Unreadable
    and refused files are reported (each, and a count by reason) and left out, never silently."""
    from worker.screening.pipeline import gated_pixels

    options = service_gate(size)
    arrays, kept, refused, notes = [], [], Counter(), Counter()
    for s in tqdm(samples, desc=desc, unit="img", leave=False):
        try:
            pixels, metadata = gated_pixels(s.path.read_bytes(), options)
        except ImageDecodeError as e:
            refused[e.code] += 1
            log.warning("skipping %s: %s", s.path.name, e)
            continue
        except OSError as e:
            refused["unreadable"] += 1
            log.warning("skipping %s: cannot be read (%s)", s.path.name, e.strerror)
            continue
        notes.update(n.split(":", 1)[0] for n in metadata.get("notes") or [])
        arrays.append(resize(pixels, size))
        kept.append(s)
    if refused or notes:
        log.warning("%s: %d of %d films refused by the quality gate (%s)%s", desc, sum(refused.values()),
                    len(samples), ", ".join(f"{c} {n}" for c, n in sorted(refused.items())) or "none",
                    "; " + ", ".join(f"{c} {n}" for c, n in sorted(notes.items())) if notes else "")
    if not kept:
        raise ValueError(f"no readable images for {desc}")
    return np.stack(arrays), kept


def make_augment(cfg: AugmentConfig) -> v2.Compose:
    ops: list = [v2.RandomAffine(degrees=cfg.rotate_degrees, translate=(cfg.translate, cfg.translate),
                                 scale=tuple(cfg.scale), interpolation=v2.InterpolationMode.BILINEAR)]
    if cfg.brightness or cfg.contrast:
        ops.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    return v2.Compose(ops)


class CachedImages(Dataset):
    """Resized [0, 1] images held in memory; optional augmentation; the worker's normalize."""

    def __init__(self, images: np.ndarray, labels: list[int], cfg: TrainConfig, *, augment: bool) -> None:
        self.images, self.labels, self.cfg = images, labels, cfg
        self.augment = make_augment(cfg.augment) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.augment is not None:
            img = self.augment(torch.from_numpy(img)[None]).clamp_(0, 1)[0].numpy()
        x = normalize(img, in_chans=self.cfg.in_chans, mean=self.cfg.mean, std=self.cfg.std)
        return torch.from_numpy(x), self.labels[i]
