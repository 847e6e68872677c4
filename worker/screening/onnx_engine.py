"""An onnxruntime engine for CPU inference.

The bundle's network is exported to ONNX once and cached by the bundle's sha256. The
exported graph returns both the logits and the ``conv_head`` feature map, so Grad-CAM
still runs in torch on the head alone (see ``explain.gradcam_from_features``).
``benchmarks/engines.py`` compares the engines.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from worker.screening.model import CxrNet

log = logging.getLogger(__name__)
OPSET = 17


class _LogitsAndFeatures(nn.Module):
    def __init__(self, model: CxrNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.last_conv(x)
        return self.model.from_last_conv(features), features


def export_onnx(model: CxrNet, *, in_chans: int, input_size: int, path: Path) -> Path:
    """Export (atomically) a graph x -> (logits, conv_head features) with a dynamic batch."""
    if not model.splits_at_last_conv:
        raise ValueError("the ONNX engine needs a backbone with a conv_head (EfficientNet family); use CXR_ENGINE=torch")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    wrapper = _LogitsAndFeatures(model).eval()
    dummy = torch.zeros(2, in_chans, input_size, input_size)
    # The TorchScript-based exporter (deprecated in torch 2.9+, still shipped): the
    # torch.export-based default needs the extra onnxscript package.
    torch.onnx.export(wrapper, (dummy,), str(tmp), input_names=["x"], output_names=["logits", "features"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}, "features": {0: "n"}},
                      opset_version=OPSET, dynamo=False)
    model.eval()  # the exporter restores the wrapper's mode recursively; keep the network in eval
    tmp.replace(path)
    return path


class OnnxEngine:
    """Runs the exported graph; returns torch tensors so the rest of the pipeline is unchanged."""

    def __init__(self, model: CxrNet, *, sha256: str, in_chans: int, input_size: int, cache_dir: Path,
                 threads: int) -> None:
        import onnxruntime as ort

        path = cache_dir / f"{sha256}-opset{OPSET}.onnx"
        if not path.exists():
            log.info("exporting the model to ONNX (once per bundle): %s", path)
            export_onnx(model, in_chans=in_chans, input_size=input_size, path=path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})
        return torch.from_numpy(logits), torch.from_numpy(features)
