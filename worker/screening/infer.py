"""Class probabilities from preprocessed inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from worker.screening.model import CxrNet


def infer(model: CxrNet, batch: np.ndarray, *, temperature: float = 1.0, bias: Sequence[float] | None = None,
          device: torch.device | None = None) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, num_classes) probabilities: softmax(logits / temperature + bias)."""
    dev = device or next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.from_numpy(batch).to(dev))
    return calibrated(logits, temperature=temperature, bias=bias)


def calibrated(logits: torch.Tensor, *, temperature: float, bias: Sequence[float] | None = None) -> np.ndarray:
    """Probabilities from raw logits with a bundle's calibration: softmax(logits / T + bias), float64."""
    z = logits.detach().cpu().double() / temperature
    if bias is not None:
        z = z + torch.tensor(list(bias), dtype=z.dtype)
    return torch.softmax(z, dim=1).numpy()
