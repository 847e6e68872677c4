"""Class probabilities from a network's logits, with a bundle's calibration."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def calibrated(logits: torch.Tensor, *, temperature: float, bias: Sequence[float] | None = None) -> np.ndarray:
    """Probabilities from raw logits with a bundle's calibration: softmax(logits / T + bias), float64."""
    z = logits.detach().cpu().double() / temperature
    if bias is not None:
        z = z + torch.tensor(list(bias), dtype=z.dtype)
    return torch.softmax(z, dim=1).numpy()
