"""Model bundle metadata: read and written without torch.

A bundle is one ``.safetensors`` file. Its tensors are the network's weights; its header
metadata holds (as JSON under the key ``cxr_bundle``) everything needed to rebuild the
network and feed it: the timm architecture, the head, class names, input size, channels,
normalisation, calibration (temperature, logit offsets) and thresholds. Because the safetensors header is plain JSON
after an 8-byte length, the API can read it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from functools import lru_cache
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUNDLE_FORMAT = "cxr-bundle/1"
META_KEY = "cxr_bundle"
_MAX_HEADER = 100 * 1024 * 1024


class BundleError(ValueError):
    """The bundle file is missing, unreadable or not a cxr-screen bundle."""


@dataclass(frozen=True)
class HeadSpec:
    """The seed's classification head: BN -> Dropout -> Linear(hidden) -> ReLU -> BN -> Dropout -> Linear."""

    hidden: int = 256
    dropout1: float = 0.3
    dropout2: float = 0.15


@dataclass(frozen=True)
class BundleMeta:
    architecture: str
    classes: list[str]
    input_size: int = 224
    in_chans: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    head: HeadSpec = field(default_factory=HeadSpec)
    temperature: float = 1.0
    # Per-class offsets added to the logits after the temperature (empty: none):
    # probabilities = softmax(logits / temperature + logit_bias). Fitted with the temperature
    # on validation (bias-corrected temperature scaling), they undo the shift in class
    # priors that class-weighted training leaves and a temperature alone cannot.
    logit_bias: list[float] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    # Out-of-distribution gate (worker/screening/reliability.py): {"method", "threshold",
    # "features", "fitted_on", ...}; its statistics are the bundle's ``ood.*`` tensors. Empty: none.
    ood: dict[str, Any] = field(default_factory=dict)
    # Uncertainty ("refer for review"): {"method", "samples", "threshold"}; empty: none.
    uncertainty: dict[str, Any] = field(default_factory=dict)
    version: str = "0"
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = BUNDLE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def bias(self) -> list[float]:
        """The logit offsets, one per class (zeros when the bundle has none)."""
        return [float(b) for b in self.logit_bias] if self.logit_bias else [0.0] * len(self.classes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BundleMeta":
        if d.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"unsupported bundle format {d.get('format')!r}; expected {BUNDLE_FORMAT!r}")
        d = dict(d)
        d["head"] = HeadSpec(**d.get("head", {}))
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise BundleError(f"bundle metadata has unknown fields {sorted(unknown)}; upgrade cxr-screen")
        meta = cls(**d)
        if len(meta.mean) != len(meta.std) or len(meta.mean) not in (1, meta.in_chans):
            raise BundleError("bundle mean/std must have one value or one per input channel")
        if len(meta.classes) < 2:
            raise BundleError("bundle must name at least two classes")
        if meta.logit_bias and len(meta.logit_bias) != len(meta.classes):
            raise BundleError("bundle logit_bias must have one value per class (or none)")
        for name, block in (("ood", meta.ood), ("uncertainty", meta.uncertainty)):
            if block and not isinstance(block.get("threshold"), (int, float)):
                raise BundleError(f"bundle {name} metadata needs a numeric threshold")
        return meta

    @property
    def ood_threshold(self) -> float | None:
        """Films whose out-of-distribution score is above this are refused (None: no OOD gate)."""
        return float(self.ood["threshold"]) if self.ood else None

    @property
    def uncertainty_threshold(self) -> float | None:
        """Films whose uncertainty is at or above this are ``uncertain`` (None: not computed)."""
        return float(self.uncertainty["threshold"]) if self.uncertainty else None


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise BundleError(f"{path} is too short to be a safetensors bundle")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise BundleError(f"{path} does not look like a safetensors bundle (header of {n} bytes)")
            return json.loads(f.read(n))
    except FileNotFoundError as e:
        raise BundleError(f"model bundle not found: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not a safetensors bundle: {e}") from e


def read_meta(path: Path) -> BundleMeta:
    header = read_header(path)
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise BundleError(
            f"{path} is a safetensors file but not a cxr-screen bundle (no '{META_KEY}' metadata); "
            "write bundles with trainer's save_bundle"
        )
    return BundleMeta.from_dict(json.loads(raw))


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so repeated asks cost a stat."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


NO_BUNDLE_HELP = (
    "No model bundle is configured. cxr-screen never screens with untrained weights.\n"
    "Get one by either:\n"
    "  - setting CXR_CHECKPOINT=/path/to/model.safetensors (a bundle written by `cxr train`), or\n"
    "  - training one: `cxr train --config configs/train_lite0.yaml`, then `cxr model activate runs/.../model.safetensors`, or\n"
    "  - placing the shipped default at models/cxr-default.safetensors."
)
