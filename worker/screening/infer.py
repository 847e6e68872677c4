"""Class probabilities from preprocessed inputs."""

from __future__ import annotations

import numpy as np
import torch

from worker.screening.model import CxrNet


def infer(model: CxrNet, batch: np.ndarray, *, temperature: float = 1.0, device: torch.device | None = None) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, num_classes) probabilities (softmax of logits / temperature)."""
    dev = device or next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.from_numpy(batch).to(dev))
        probs = torch.softmax(logits.float() / temperature, dim=1)
    return probs.cpu().numpy().astype(np.float64)
