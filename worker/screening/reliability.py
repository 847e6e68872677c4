"""What the model knows it does not know: an out-of-distribution score and an uncertainty.

Both come from the forward pass the service already runs, with no second pass through the
backbone:

- **Out-of-distribution score** (Lee et al., "A Simple Unified Framework for Detecting
  Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018): the squared
  Mahalanobis distance of the network's pooled features to the nearest class mean, under one
  covariance shared by the classes (fitted on the training films, shrunk with Ledoit-Wolf so
  that a 1,280-dimensional covariance from a few thousand films stays invertible). A film
  far from every class is not what the network was trained on: a knee, a CT slice, a
  photograph, a page of text. The gate refuses it as ``not_chest`` above the bundle's
  threshold, before any probability is stored.
- **Uncertainty**, one of three measures, chosen per bundle on validation (lowest area under
  the risk-coverage curve) and named in its metadata:
  ``mc-dropout-bald``: Monte Carlo dropout in the head (Gal and Ghahramani, "Dropout as a
  Bayesian Approximation", ICML 2016): the head's two dropout layers are kept on for ``T``
  passes over the same pooled features, with masks drawn once from a fixed seed (so a film
  gets the same value whatever batch it is in); the value is the mutual information between
  the prediction and the masks (BALD, Houlsby et al. 2011), in nats. The head is tiny, so ``T``
  passes cost well under a millisecond a film.
  ``mc-dropout-entropy``: the entropy (nats) of the mean of those ``T`` calibrated
  probabilities (total predictive uncertainty).
  ``softmax-response``: 1 - the top calibrated probability (Geifman and El-Yaniv, NeurIPS 2017).

The statistics travel in the bundle: the tensors ``ood.class_means`` (K, F) and
``ood.precision`` (F, F) beside the weights, the thresholds and method names in its
metadata (``BundleMeta.ood``, ``BundleMeta.uncertainty``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

OOD_PREFIX = "ood."
OOD_METHOD = "mahalanobis-tied (Lee et al. 2018)"
BALD, MC_ENTROPY, SOFTMAX_RESPONSE = "mc-dropout-bald", "mc-dropout-entropy", "softmax-response"
UNCERTAINTY_METHODS = (BALD, MC_ENTROPY, SOFTMAX_RESPONSE)
MC_SAMPLES = 32
MC_SEED = 20161


@dataclass(frozen=True)
class OodStats:
    """Class means (K, F) and the shared precision matrix (F, F) of pooled features, float32."""

    class_means: torch.Tensor
    precision: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{OOD_PREFIX}class_means": self.class_means.float().contiguous(),
                f"{OOD_PREFIX}precision": self.precision.float().contiguous()}

    @classmethod
    def from_tensors(cls, state: dict[str, torch.Tensor]) -> OodStats | None:
        """The statistics from a bundle's tensors, or None when it has none."""
        means, prec = state.get(f"{OOD_PREFIX}class_means"), state.get(f"{OOD_PREFIX}precision")
        if means is None or prec is None:
            return None
        return cls(class_means=means.float(), precision=prec.float())

    def score(self, pooled: torch.Tensor) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean.

        Args:
            pooled: (N, F) pooled features (``pooled_features``).
        Returns:
            (N,) float64, unitless (about F for a typical in-distribution film).
        """
        f = pooled.detach().float().cpu()
        d = f[:, None, :] - self.class_means[None, :, :]  # (N, K, F)
        m = torch.einsum("nkf,fg,nkg->nk", d, self.precision, d)
        return m.min(dim=1).values.double().numpy()


def pooled_features(model: nn.Module, conv_features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) ``conv_head`` output -> (N, F) pooled features the head reads.

    The same BN, activation and global average pooling ``CxrNet.from_last_conv`` runs."""
    b = model.backbone
    with torch.no_grad():
        return b.forward_head(b.bn2(conv_features.float())).float()


def fit_ood(pooled: np.ndarray, labels: np.ndarray, num_classes: int) -> OodStats:
    """Fit class means and a shared, Ledoit-Wolf-shrunk covariance on training features.

    Args:
        pooled: (N, F) pooled features of the training films.
        labels: (N,) class indices.
    Raises:
        ValueError: a class has no film.
    """
    from sklearn.covariance import LedoitWolf

    pooled = np.asarray(pooled, dtype=np.float64)
    means = []
    for c in range(num_classes):
        rows = pooled[labels == c]
        if not len(rows):
            raise ValueError(f"class {c} has no training film to fit the out-of-distribution statistics on")
        means.append(rows.mean(axis=0))
    centred = pooled - np.stack(means)[labels]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    return OodStats(class_means=torch.from_numpy(np.stack(means)).float(),
                    precision=torch.from_numpy(lw.precision_).float())


def _dropout_masks(n_features: int, hidden: int, p1: float, p2: float, samples: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(MC_SEED)
    m1 = (torch.rand(samples, n_features, generator=g) >= p1).float() / (1.0 - p1)
    m2 = (torch.rand(samples, hidden, generator=g) >= p2).float() / (1.0 - p2)
    return m1, m2


def mc_dropout_logits(head: nn.Sequential, pooled: torch.Tensor, *, samples: int = MC_SAMPLES) -> torch.Tensor:
    """Logits of ``samples`` passes through the seed's head with its dropouts on.

    The head is BN -> Dropout(p1) -> Linear -> ReLU -> BN -> Dropout(p2) -> Linear; the
    BatchNorms keep their running statistics (eval), only the dropout masks vary. The masks
    are the same for every film (a fixed seed), so a film's value does not depend on its batch.

    Args:
        head: the network's head (``CxrNet.head``).
        pooled: (N, F) pooled features.
    Returns:
        (samples, N, K) float32 logits.
    """
    bn1, drop1, fc1, relu, bn2, drop2, fc2 = head
    m1, m2 = _dropout_masks(pooled.shape[1], fc1.out_features, drop1.p, drop2.p, samples)
    with torch.no_grad():
        h = bn1(pooled.float())  # (N, F)
        h = relu(fc1(h[None] * m1[:, None, :]))  # (T, N, hidden)
        h = bn2(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        return fc2(h * m2[:, None, :]).float()


def bald(probs: np.ndarray) -> np.ndarray:
    """Mutual information between the prediction and the dropout masks, in nats.

    Args:
        probs: (T, N, K) probabilities of T stochastic passes.
    Returns:
        (N,) H(mean_t p_t) - mean_t H(p_t), >= 0.
    """
    eps = 1e-12
    mean = probs.mean(axis=0)
    h_mean = -(mean * np.log(mean + eps)).sum(axis=-1)
    mean_h = -(probs * np.log(probs + eps)).sum(axis=-1).mean(axis=0)
    return np.maximum(h_mean - mean_h, 0.0)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) over the last axis."""
    return -(probs * np.log(probs + 1e-12)).sum(axis=-1)


def mc_probs(head: nn.Sequential, pooled: torch.Tensor, *, temperature: float, bias: Sequence[float] | None,
             samples: int = MC_SAMPLES) -> np.ndarray:
    """(samples, N, K) calibrated probabilities of the MC-dropout passes."""
    from worker.screening.infer import calibrated

    logits = mc_dropout_logits(head, pooled, samples=samples)
    t, n, k = logits.shape
    return calibrated(logits.reshape(t * n, k), temperature=temperature, bias=bias).reshape(t, n, k)


def uncertainty_of(method: str, *, head: nn.Sequential, pooled: torch.Tensor, probs: np.ndarray,
                   temperature: float, bias: Sequence[float] | None) -> np.ndarray:
    """The uncertainty (N,) of each film by ``method`` (one of ``UNCERTAINTY_METHODS``).

    Args:
        probs: (N, K) the film's calibrated probabilities from the deterministic pass.
    Raises:
        ValueError: an unknown method.
    """
    if method == SOFTMAX_RESPONSE:
        return 1.0 - np.asarray(probs).max(axis=-1)
    if method in (BALD, MC_ENTROPY):
        p = mc_probs(head, pooled, temperature=temperature, bias=bias)
        return bald(p) if method == BALD else entropy(p.mean(axis=0))
    raise ValueError(f"unknown uncertainty method {method!r}; use one of {', '.join(UNCERTAINTY_METHODS)}")


@dataclass(frozen=True)
class Reliability:
    """Per film: the OOD score (None without statistics) and the uncertainty (None without a method)."""

    ood_score: float | None
    uncertainty: float | None


def assess(model: nn.Module, conv_features: torch.Tensor, probs: np.ndarray, *, ood: OodStats | None,
           temperature: float, bias: Sequence[float] | None, method: str | None) -> list[Reliability]:
    """OOD score and uncertainty (by ``method``; None: none) of each film of a batch, from its
    ``conv_head`` features (N, C, h, w) and calibrated probabilities (N, K)."""
    n = conv_features.shape[0]
    if ood is None and not method:
        return [Reliability(None, None)] * n
    pooled = pooled_features(model, conv_features)
    scores = ood.score(pooled) if ood is not None else [None] * n
    unc = (uncertainty_of(method, head=model.head, pooled=pooled, probs=probs, temperature=temperature, bias=bias)
           if method else [None] * n)
    return [Reliability(None if s is None else float(s), None if u is None else float(u))
            for s, u in zip(scores, unc)]
