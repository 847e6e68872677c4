"""The one place the network is built, saved and loaded.

The network is a timm backbone (any timm name; ``efficientnet_b0`` is the seed's) with
the seed's head. Everything needed to rebuild it travels in the bundle's metadata, so a
worker never relies on constants.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cxr.bundle import META_KEY, BundleError, BundleMeta, HeadSpec, file_sha256, read_meta
from worker.screening.reliability import OOD_PREFIX, OodStats

log = logging.getLogger(__name__)


def make_head(num_features: int, num_classes: int, spec: HeadSpec) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm1d(num_features),
        nn.Dropout(spec.dropout1),
        nn.Linear(num_features, spec.hidden),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(spec.hidden),
        nn.Dropout(spec.dropout2),
        nn.Linear(spec.hidden, num_classes),
    )


class CxrNet(nn.Module):
    """timm backbone (pooled features) followed by the seed's head."""

    def __init__(self, meta: BundleMeta, *, pretrained: bool = False) -> None:
        super().__init__()
        self.backbone = timm.create_model(
            meta.architecture, pretrained=pretrained, num_classes=0, in_chans=meta.in_chans
        )
        self.head = make_head(self.backbone.num_features, len(meta.classes), meta.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def splits_at_last_conv(self) -> bool:
        """True for backbones (the EfficientNet family) with a final ``conv_head``."""
        return all(hasattr(self.backbone, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2",
                                                       "forward_head"))

    def last_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The ``conv_head`` output (before its BN/activation): the Grad-CAM feature map."""
        b = self.backbone
        return b.conv_head(b.blocks(b.bn1(b.conv_stem(x))))

    def from_last_conv(self, a: torch.Tensor) -> torch.Tensor:
        """Logits from the ``conv_head`` output: ``forward(x) == from_last_conv(last_conv(x))``."""
        return self.head(self.backbone.forward_head(self.backbone.bn2(a)))

    def cam_target_layer(self) -> nn.Module:
        """The last convolution: ``conv_head`` where the backbone has one, else its last block."""
        if hasattr(self.backbone, "conv_head"):
            return self.backbone.conv_head
        return self.backbone.blocks[-1]


def build_model(meta: BundleMeta, *, pretrained: bool = False) -> CxrNet:
    return CxrNet(meta, pretrained=pretrained)


def save_bundle(path: Path, model: CxrNet, meta: BundleMeta, *, half: bool = False,
                ood: OodStats | None = None) -> Path:
    """Write weights, metadata and the optional out-of-distribution statistics (kept in
    float32 as ``ood.*`` tensors) to one safetensors file (atomically)."""
    if not meta.created_at:
        meta = replace(meta, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    tensors = {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.half()
        tensors[k] = t.contiguous()
    if ood is not None:
        tensors.update(ood.tensors())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: meta.to_json()})
    tmp.replace(path)
    return path


@dataclass
class LoadedModel:
    model: CxrNet
    meta: BundleMeta
    sha256: str
    path: Path
    device: torch.device
    ood: OodStats | None = None  # the out-of-distribution statistics, when the bundle has them


def resolve_device(requested: str) -> torch.device:
    """The device to run on: ``requested``, or the CPU (with a log line saying why) when it
    asks for CUDA and no usable GPU is there. Call it in the process that will use the
    device (after any fork): the check initialises CUDA."""
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            log.warning("CXR_DEVICE=%s but no CUDA GPU is usable here (torch %s, CUDA build %s); running on the CPU",
                        requested, torch.__version__, torch.version.cuda)
            return torch.device("cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            log.warning("CXR_DEVICE=%s but only %d GPU(s) are visible; running on cuda:0", requested,
                        torch.cuda.device_count())
            return torch.device("cuda", 0)
    return dev


def load_bundle(path: Path, *, device: str = "cpu") -> LoadedModel:
    """Rebuild the network from a bundle and load its weights (strict). On CUDA the model
    is kept channels_last, the layout its convolutions run fastest in under AMP."""
    meta = read_meta(path)
    model = build_model(meta, pretrained=False)
    state = load_file(str(path))
    ood = OodStats.from_tensors(state)
    if meta.ood and ood is None:
        raise BundleError(f"{path}: its metadata sets an out-of-distribution threshold but it has no "
                          f"{OOD_PREFIX}* statistics; write it again with save_bundle")
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith(OOD_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{path}: weights do not match architecture {meta.architecture!r}: {e}") from e
    dev = resolve_device(device)
    model.to(dev).eval()
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    sha = file_sha256(path)
    log.info("loaded model bundle %s (%s, version %s, sha256 %s) on %s", path.name, meta.architecture,
             meta.version, sha[:12], dev)
    return LoadedModel(model=model, meta=meta, sha256=sha, path=path, device=dev, ood=ood if meta.ood else None)
